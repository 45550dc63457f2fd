"""One ``istune train`` run as the layers below the recipe see it: its data and evaluation options
(:class:`RunArgs`), the rows it trains on and holds out, its batch layout, and the values of a
saved run.

The recipe (``istune train``, ``istune eval``), the benchmarks and the analyses read runs
through this module, so a saved run's held-out examples and batch layout are the same
wherever they are rebuilt::

    run = RunArgs.from_saved(results["run"])
    train_rows, heldout_rows = load_rows(run, saved_training_value(results, "seed"))
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from istune.data.tasks import TASKS, TEST_ITEMS, is_task_spec, parse_task_spec, training_rows
from istune.eval.tasks import method_list, parse_eval_tasks
from istune.models import batch_layout_unsupported, check_model_name
from istune.option_checks import require_at_least_one

COMMONSENSE = "commonsense"
COMPARE_FILE = "compare.json"  # an `istune compare` folder: the options its runs share, its arms and seeds
COMPARE_RUNS = "runs"  # ... and its runs, one folder each (comparison_run_folder)


@dataclass
class RunArgs:
    """What to train on and how to evaluate (the Trainer's own options are in TrainingArguments)."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "Hub id, local path, or 'smollm2-135m' (embedded, offline)."})
    data: str = field(default=COMMONSENSE, metadata={
        "help": "'commonsense' (the packaged 8-task mix), an LLM-Adapters JSON file, or a synthetic exact-match task "
                "'task:NAME[:key=value...]' (generated, seeded; its own test items are the evaluation): "
                + ", ".join(f"task:{name}" for name in TASKS) + " (docs/data.md)."})
    train_samples: int | None = field(default=2000, metadata={
        "help": "Examples drawn (seeded by --seed) from the data; all if unset."})
    heldout_samples: int = field(default=64, metadata={
        "help": "Examples held out from the training data for the held-out loss (also the eval_dataset of "
                "--eval_strategy)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Allow writing into an --output_dir that already holds a run."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example (LLM-Adapters' cutoff_len)."})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "Put the prompt tokens in the loss too (LLM-Adapters' default)."})
    padding_free: bool = field(default=True, metadata={
        "help": "Pack each batch's examples into one row instead of padding them (TRL's padding_free): the same "
                "loss, no work on padding. Off, with the reason, for a model or attention kernel not known to keep "
                "packed examples apart."})
    labelled_logits_only: bool = field(default=True, metadata={
        "help": "Project onto the vocabulary only the positions that predict a labelled token (with the prompt "
                "masked, the answer): the same loss, less work and memory. Off, with the reason, where the model or "
                "--label_smoothing_factor needs every position's logits."})
    eval_seed: int = field(default=0, metadata={
        "help": "Seed of the evaluation sample (kept apart from --seed so runs compare on the same items)."})
    eval_tasks: str = field(default="all", metadata={
        "help": "Comma-separated commonsense tasks to evaluate after training, 'all' or 'none'."})
    eval_limit: int | None = field(default=24, metadata={
        "help": "Items per task (a seeded sample); the whole test sets if unset."})
    eval_method: str = field(default="both", metadata={
        "help": "'generate' (LLM-Adapters protocol), 'score' (option log-likelihood) or 'both'."})
    generation_batch_size: int = field(default=32, metadata={
        "help": "Prompts per generate call in the evaluation (--per_device_eval_batch_size is the scoring and "
                "held-out loss batch)."})
    compare_base: bool = field(default=True, metadata={"help": "Also evaluate the base model, without adapters."})
    curve_every: int = field(default=0, metadata={
        "help": "Every K optimizer steps (and at step 0), also measure the accuracy on the evaluation items: a "
                "learning curve, kept in results.json as 'curve' with the seconds it took (not training time). "
                "0: accuracy only after training."})

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> RunArgs:
        """The RunArgs of a saved run; fields of older versions (now Trainer options) are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})


# Trainer options that older results.json files kept under "run", by their old names.
_OLD_NAMES = {"per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size"}


def saved_training_value(results: dict[str, Any], name: str, default: Any = None) -> Any:
    """A Trainer option of a saved run (``results["training"]``), also from files written before it moved there."""
    if name in results.get("training", {}):
        return results["training"][name]
    if name == "seed" and "ist" in results:
        return results["ist"]["seed"]  # older runs had one seed, ISTConfig's
    return results.get("run", {}).get(_OLD_NAMES.get(name, name), default)


def check_run(run: RunArgs) -> list[str]:
    """Validate the data and evaluation options (before anything loads); return the eval task names."""
    require_at_least_one(run, ("cutoff_len", "heldout_samples", "generation_batch_size"))
    if isinstance(run.curve_every, bool) or not isinstance(run.curve_every, int) or run.curve_every < 0:
        raise ValueError(f"--curve_every={run.curve_every!r} must be a number of steps >= 1, or 0 for no curve.")
    check_model_name(run.model)
    for name in ("train_samples", "eval_limit"):
        if getattr(run, name) is not None and getattr(run, name) < 1:
            raise ValueError(f"--{name}={getattr(run, name)!r} must be at least 1 (leave it unset for all).")
    method_list(run.eval_method)
    if is_task_spec(run.data):
        return _check_task_run(run)
    if run.data != COMMONSENSE and not Path(run.data).is_file():
        raise ValueError(f"--data={run.data!r} is neither 'commonsense', an existing LLM-Adapters JSON file, nor a "
                         f"task spec ('task:NAME', NAME one of {', '.join(TASKS)}).")
    return parse_eval_tasks(run.eval_tasks)


def _check_task_run(run: RunArgs) -> list[str]:
    """A synthetic task's options; its evaluation is its own test items, by generation and exact match."""
    parse_task_spec(run.data)
    if run.train_samples is None:
        raise ValueError(f"--data={run.data!r} is generated, so it has no 'all'; give --train_samples N (steps x "
                         "batch size covers each example once).")
    if run.eval_method == "score":
        raise ValueError(f"--eval_method=score with --data={run.data!r}: a task's answers have no options to score; "
                         "use --eval_method generate (exact match).")
    if run.eval_limit is not None and run.eval_limit > TEST_ITEMS:
        raise ValueError(f"--eval_limit={run.eval_limit} with --data={run.data!r}: a task has {TEST_ITEMS} test "
                         f"items; use at most {TEST_ITEMS}.")
    choice = run.eval_tasks.strip().lower()
    if choice not in ("all", "none", run.data.lower()):
        raise ValueError(f"--eval_tasks={run.eval_tasks!r} with --data={run.data!r}: a task is evaluated on its own "
                         "test items; use 'all' (the default) or 'none'.")
    return [] if choice == "none" else [run.data]


def load_rows(run: RunArgs, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded sample of the data, the held-out part disjoint."""
    from istune.data import build_commonsense_train, load_llm_adapters_json

    if is_task_spec(run.data):  # generated for this seed, every prompt distinct and none a test item
        rows = training_rows(parse_task_spec(run.data), run.heldout_samples + run.train_samples, seed)
        return rows[run.heldout_samples:], rows[: run.heldout_samples]
    rows = build_commonsense_train() if run.data == COMMONSENSE else load_llm_adapters_json(run.data)
    if len(rows) <= run.heldout_samples:
        raise ValueError(f"--data={run.data!r} has {len(rows)} examples; it needs more than --heldout_samples="
                         f"{run.heldout_samples}.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    heldout = [rows[i] for i in order[: run.heldout_samples]]
    train_count = len(order) - run.heldout_samples if run.train_samples is None else run.train_samples
    train = [rows[i] for i in order[run.heldout_samples: run.heldout_samples + train_count]]
    return train, heldout


def batch_layout(run: RunArgs, model, training=None, say=print) -> dict[str, bool]:
    """``CausalLMCollator`` options from --padding_free and --labelled_logits_only, each turned off (and said
    why) where this model, tried on two short rows, or the Trainer's options (if given) cannot use it."""
    layout = {"padding_free": run.padding_free, "labelled_logits_only": run.labelled_logits_only}
    reasons = batch_layout_unsupported(model, **layout) if any(layout.values()) else {}
    if run.labelled_logits_only and getattr(training, "label_smoothing_factor", 0):
        smoothing = training.label_smoothing_factor
        reasons["labelled_logits_only"] = f"--label_smoothing_factor={smoothing} needs every logit"
    for name, reason in reasons.items():
        if reason:
            layout[name] = False
            say(f"istune: --{name} off: {reason}.")
    if layout["padding_free"]:
        model.config.use_cache = False  # a KV cache would hide the restarting positions from the attention mask
    return layout


def comparison_run_folder(out: str | Path, arm: str, seed: int) -> Path:
    """The folder of arm ``arm`` at ``seed`` in an ``istune compare`` folder (``quarter:4`` -> ``quarter_4``)."""
    return Path(out) / COMPARE_RUNS / f"{arm.replace(':', '_').replace('=', '-')}-seed{seed}"


def quarter_layers(quarter: int, num_layers: int) -> list[int]:
    """Quarter 1 (bottom) to 4 (top) of the layers, as ``istune compare``'s ``quarter:K`` arms train them:
    N_u = round(N_L / 4) consecutive layers, the four starts spread evenly from 0 to N_L - N_u (N_L = 30:
    0-7, 7-14, 15-22, 22-29)."""
    size = max(1, math.floor(num_layers / 4 + 0.5))
    start = math.floor((quarter - 1) * (num_layers - size) / 3 + 0.5)
    return list(range(start, start + size))
