"""The fine-tuning recipe behind `istune train`: data, adapters, Trainer with IST, saving, evaluation.

    istune train                                   # embedded default: SmolLM2-135M, LoRA+IST, commonsense slice
    istune train --strategy all --output_dir runs/lora   # the same run as plain LoRA

Options come in five dataclasses: :class:`RunArgs` (data and evaluation), :class:`ModelArgs`
(how the model loads), :class:`AdapterArgs` (the PEFT method), :class:`ISTConfig` and the
Trainer's own ``TrainingArguments`` (:class:`RecipeTrainingArguments`, with the main job's
defaults). Everything is checked before the model is loaded. Under a launcher (torchrun,
accelerate) every process trains; only the main one writes and evaluates. The output folder
gets the adapters (``adapter/``), the IST log (``ist_log.jsonl``), the run's options
(``istune_run.json``, also in every checkpoint) and the evaluation (``results.json``); the
adapters and every file are written whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from istune.config import ISTConfig
from istune.recipe.methods import AdapterArgs, add_adapters, save_adapters
from istune.recipe.models import ModelArgs
from istune.recipe.options import require_at_least_one

COMMONSENSE = "commonsense"


@dataclass
class RunArgs:
    """What to train on and how to evaluate (the Trainer's own options are in TrainingArguments)."""

    model: str = field(default="smollm2-135m", metadata={"help": "Hub id, local path, or 'smollm2-135m' (embedded, offline)."})
    data: str = field(default=COMMONSENSE, metadata={"help": "'commonsense' (the packaged 8-task mix) or an LLM-Adapters JSON file."})
    train_samples: Optional[int] = field(default=2000, metadata={"help": "Examples drawn (seeded by --seed) from the data; all if unset."})
    heldout_samples: int = field(default=64, metadata={"help": "Examples held out from the training data for the held-out loss (also the eval_dataset of --eval_strategy)."})
    overwrite: bool = field(default=False, metadata={"help": "Allow writing into an --output_dir that already holds a run."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example (LLM-Adapters' cutoff_len)."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Put the prompt tokens in the loss too (LLM-Adapters' default)."})
    padding_free: bool = field(default=True, metadata={"help": "Pack each batch's examples into one row instead of padding them "
                               "(TRL's padding_free): the same loss, no work on padding. Off, with the reason, for a model "
                               "or attention kernel not known to keep packed examples apart."})
    labelled_logits_only: bool = field(default=True, metadata={"help": "Project onto the vocabulary only the positions that "
                                       "predict a labelled token (with the prompt masked, the answer): the same loss, less "
                                       "work and memory. Off, with the reason, where the model or --label_smoothing_factor "
                                       "needs every position's logits."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation sample (kept apart from --seed so runs compare on the same items)."})
    eval_tasks: str = field(default="all", metadata={"help": "Comma-separated commonsense tasks to evaluate after training, 'all' or 'none'."})
    eval_limit: Optional[int] = field(default=24, metadata={"help": "Items per task (a seeded sample); the whole test sets if unset."})
    eval_method: str = field(default="both", metadata={"help": "'generate' (LLM-Adapters protocol), 'score' (option log-likelihood) or 'both'."})
    generation_batch_size: int = field(default=32, metadata={"help": "Prompts per generate call in the evaluation "
                                       "(--per_device_eval_batch_size is the scoring and held-out loss batch)."})
    compare_base: bool = field(default=True, metadata={"help": "Also evaluate the base model, without adapters."})

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> "RunArgs":
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


def check_run(run: RunArgs, adapter: Optional[AdapterArgs] = None, ist: Optional[ISTConfig] = None) -> list[str]:
    """Validate the data and evaluation options; return the eval task names."""
    from istune.data.commonsense_format import COMMONSENSE_TASKS, canonical_task

    require_at_least_one(run, ("cutoff_len", "heldout_samples", "generation_batch_size"))
    for name in ("train_samples", "eval_limit"):
        if getattr(run, name) is not None and getattr(run, name) < 1:
            raise ValueError(f"--{name}={getattr(run, name)!r} must be at least 1 (leave it unset for all).")
    if run.eval_method not in ("generate", "score", "both"):
        raise ValueError(f"--eval_method={run.eval_method!r}: use 'generate', 'score' or 'both'.")
    if run.data != COMMONSENSE and not Path(run.data).is_file():
        raise ValueError(f"--data={run.data!r} is neither 'commonsense' nor an existing LLM-Adapters JSON file.")
    if run.eval_tasks.strip().lower() == "none":
        return []
    if run.eval_tasks.strip().lower() == "all":
        return list(COMMONSENSE_TASKS)
    return [canonical_task(task) for task in run.eval_tasks.split(",") if task.strip()]


def check_job(run: RunArgs, model_args: ModelArgs, adapter: AdapterArgs, ist: ISTConfig, training) -> tuple[list[str], Optional[str]]:
    """Everything that can be checked before the model loads; return the eval tasks and the checkpoint to resume."""
    from istune.recipe.checkpoints import check_resume, resolve_resume
    from istune.recipe.models import check_model_args

    tasks = check_run(run, adapter, ist)
    require_at_least_one(training, ("per_device_train_batch_size", "per_device_eval_batch_size",
                                    "gradient_accumulation_steps"))
    if training.max_steps == 0 or (training.max_steps < 0 and training.num_train_epochs <= 0):
        raise ValueError(f"--max_steps={training.max_steps!r} must be at least 1, or -1 with --num_train_epochs above 0.")
    if training.learning_rate <= 0:
        raise ValueError(f"--learning_rate={training.learning_rate!r} must be positive.")
    check_model_args(model_args, adapter.method)
    output = Path(training.output_dir)
    if output.exists() and any((output / name).exists() for name in ("adapter", "results.json")) and not run.overwrite:
        raise ValueError(f"--output_dir={training.output_dir!r} already holds a run; choose another folder or pass --overwrite.")
    resume = resolve_resume(training.resume_from_checkpoint, training.output_dir)
    if resume is not None:
        check_resume(resume, run_record(run, model_args, adapter, ist), _num_layers(run.model))
    return tasks, resume


def run_record(run: RunArgs, model_args: ModelArgs, adapter: AdapterArgs, ist: ISTConfig) -> dict[str, Any]:
    """istune's options of a run, as ``istune_run.json`` and results.json keep them."""
    return {"run": asdict(run), "model_loading": asdict(model_args), "adapter": asdict(adapter), "ist": ist.to_dict()}


def _num_layers(model: str) -> Optional[int]:
    """N_L from the model's config when it is a local folder (no download, no conversion); else None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    return values.get("num_hidden_layers", values.get("n_layer"))


def load_rows(run: RunArgs, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded sample of the data, the held-out part disjoint."""
    from istune.data import build_commonsense_train, load_llm_adapters_json

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


def load_eval_items(tasks: list[str], limit: Optional[int], seed: int) -> dict[str, list[dict]]:
    """A seeded sample of ``limit`` items per task, the same for every run with that seed."""
    from istune.data import load_commonsense_eval

    items = {}
    for task in tasks:
        rows = load_commonsense_eval(task)
        if limit is not None and limit < len(rows):
            rows = random.Random(f"{seed}:{task}").sample(rows, limit)
        items[task] = rows
    return items


def evaluate(model, tokenizer, items: dict[str, list[dict]], heldout, collate, run: RunArgs,
             batch_size: int = 8) -> dict[str, Any]:
    """Held-out loss, and generation and/or option-scoring accuracy per task."""
    from istune.eval import evaluate_tasks
    from istune.eval.loss import heldout_loss

    result: dict[str, Any] = {"heldout_loss": heldout_loss(model, heldout, collate, batch_size)}
    if items:
        methods = ["generate", "score"] if run.eval_method == "both" else [run.eval_method]
        evaluated = evaluate_tasks(model, tokenizer, items, method=methods, batch_size=batch_size,
                                   generation_batch_size=run.generation_batch_size, progress=True)
        for method, summary in evaluated.items():
            result[method] = {"tasks": {t: s["accuracy"] for t, s in summary["tasks"].items()}, "average": summary["average"]}
    return result


def train(run: RunArgs, adapter: AdapterArgs, ist: ISTConfig, training=None,
          model_args: Optional[ModelArgs] = None) -> dict[str, Any]:
    """Run the whole recipe and return the results (also written to ``output_dir/results.json``).

    Args:
        training: the Trainer's options (``TrainingArguments``); default
            :class:`~istune.recipe.training_args.RecipeTrainingArguments`, the main job's.
        model_args: how the model loads; default float32 on CPU, bfloat16 on a GPU that has it.
    """
    from transformers import Trainer, set_seed

    from istune.data import CausalLMCollator, InstructionDataset
    from istune.integrations.hf import add_ist
    from istune.recipe.checkpoints import RunFileCallback, write_run_file
    from istune.recipe.models import load_model_and_tokenizer, loading_kwargs
    from istune.recipe.training_args import RecipeTrainingArguments

    started = time.time()
    training = training if training is not None else RecipeTrainingArguments()
    model_args = model_args if model_args is not None else ModelArgs()
    tasks, resume = check_job(run, model_args, adapter, ist, training)
    main = training.process_index == 0  # under a launcher only the main process writes, prints and evaluates
    say = print if main else (lambda *args, **kwargs: None)
    set_seed(training.seed)  # data sample, adapter initialisation and the Trainer; IST has its own seed
    with training.main_process_first(desc="data"):
        train_rows, heldout_rows = load_rows(run, training.seed)
        items = load_eval_items(tasks, run.eval_limit, run.eval_seed) if main else {}
    load = loading_kwargs(model_args, training.local_process_index)
    with training.main_process_first(desc="model"):
        model, tokenizer = load_model_and_tokenizer(run.model, **load)
    train_set = InstructionDataset(train_rows, tokenizer, run.cutoff_len, run.train_on_inputs)
    heldout_set = InstructionDataset(heldout_rows, tokenizer, run.cutoff_len, train_on_inputs=False)
    say(f"istune: {run.model} ({load['dtype']}{', ' + _quantization(model_args) if model_args.quantized else ''}) | "
        f"{len(train_rows)} training examples, {len(heldout_rows)} held out | "
        f"eval: {', '.join(tasks) or 'none'} x {run.eval_limit or 'all'}")

    record = run_record(run, model_args, adapter, ist)
    if model_args.quantized:
        from peft import prepare_model_for_kbit_training

        from istune.core.probe import keep_quantized_layers_trainable

        keep_quantized_layers_trainable(model)  # before any evaluation: bitsandbytes' CPU repacking drops gradients

        # Checkpointing only if asked (--activation_checkpointing, alias --gradient_checkpointing), non-reentrant unless told otherwise (DDP needs it).
        checkpointing = training.gradient_checkpointing or getattr(training, "activation_checkpointing", False)
        kwargs = training.gradient_checkpointing_kwargs or getattr(training, "activation_checkpointing_kwargs", None)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=kwargs or {"use_reentrant": False})
    layout = batch_layout(run, model, training, say)  # after keep_quantized_layers_trainable: it runs eval forwards
    collate = CausalLMCollator(tokenizer, **layout)
    model = add_adapters(model, adapter, total_steps=_total_steps(training, len(train_set)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"istune: {adapter.method} adapters, {trainable:,} trainable of {total:,} parameters; strategy {ist.strategy!r}")
    trainer = Trainer(model=model, args=training, train_dataset=train_set, eval_dataset=heldout_set,
                      data_collator=collate, callbacks=[RunFileCallback(record)])
    callback = add_ist(trainer, ist)  # with the Trainer: reporters get IST metrics, FSDP2 checkpoints every adapter
    train_started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    results: dict[str, Any] = {**record, "training": _jsonable(training.to_dict()),
                               "batch_layout": layout, "train_seconds": time.time() - train_started,
                               "importance": callback.importance.tolist(),
                               "log_history": trainer.state.log_history}
    if not main:
        return results
    output = Path(training.output_dir)
    _save_adapters_whole(model, output / "adapter", adapter)
    write_run_file(output, record)

    say("istune: evaluating the tuned model")
    results["tuned"] = evaluate(model.eval(), tokenizer, items, heldout_set, collate, run, training.per_device_eval_batch_size)
    if run.compare_base:  # cached by (model files, items, method): a repeated run does not recompute it
        from istune.recipe.evaluate import evaluate_base

        del trainer, model, callback
        _free_memory()
        base, _ = load_model_and_tokenizer(run.model, **load)
        results["base"] = evaluate_base(base.eval(), tokenizer, items, heldout_set, collate, method=run.eval_method,
                                        batch_size=training.per_device_eval_batch_size, model_name=run.model,
                                        generation_batch_size=run.generation_batch_size)
    results["total_seconds"] = time.time() - started
    write_json(output / "results.json", results)
    say(format_results(results))
    return results


def batch_layout(run: RunArgs, model, training=None, say=print) -> dict[str, bool]:
    """``CausalLMCollator`` options from --padding_free and --labelled_logits_only, each turned off (and said
    why) where this model, tried on two short rows, or the Trainer's options (if given) cannot use it."""
    from istune.recipe.models import batch_layout_unsupported

    layout = {"padding_free": run.padding_free, "labelled_logits_only": run.labelled_logits_only}
    reasons = batch_layout_unsupported(model, **layout) if any(layout.values()) else {}
    if run.labelled_logits_only and getattr(training, "label_smoothing_factor", 0):
        reasons["labelled_logits_only"] = f"--label_smoothing_factor={training.label_smoothing_factor} needs every logit"
    for name, reason in reasons.items():
        if reason:
            layout[name] = False
            say(f"istune: --{name} off: {reason}.")
    if layout["padding_free"]:
        model.config.use_cache = False  # a KV cache would hide the restarting positions from the attention mask
    return layout


def _total_steps(training, train_examples: int) -> int:
    """Optimizer steps of the run: --max_steps, or the epochs' steps over all processes."""
    if training.max_steps > 0:
        return training.max_steps
    per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size
    return max(1, math.ceil(train_examples / per_step * training.num_train_epochs))


def _quantization(model_args: ModelArgs) -> str:
    return "4-bit NF4" if model_args.load_in_4bit else "8-bit"


def _save_adapters_whole(model, directory: Path, adapter: AdapterArgs) -> None:
    """Save the adapters into a temporary folder beside ``directory``, then put it in place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the adapters are as readable as any output
    try:
        save_adapters(model, tmp, adapter)
        if directory.exists():  # --overwrite of an earlier run
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def format_results(results: dict[str, Any]) -> str:
    """Base vs tuned: per-task accuracy for each evaluation method, the average and the held-out loss."""
    runs = [name for name in ("base", "tuned") if name in results]
    lines = []
    for method, title in (("generate", "generation accuracy (%)"), ("score", "option-scoring accuracy (%)")):
        if not any(method in results[name] for name in runs):
            continue
        tasks = list(results[runs[-1]][method]["tasks"])
        lines.append(f"\n{title}")
        lines.append(f"{'task':<14}" + "".join(f"{name:>10}" for name in runs))
        for task in tasks + ["average"]:
            values = [results[n][method]["average"] if task == "average" else results[n][method]["tasks"][task]
                      for n in runs]
            lines.append(f"{task:<14}" + "".join(f"{100 * v:>10.1f}" for v in values))
    lines.append(f"\n{'held-out loss':<14}" + "".join(f"{results[n]['heldout_loss']:>10.4f}" for n in runs))
    if "train_seconds" in results:
        lines.append(f"training {results['train_seconds']:.0f} s, whole run {results.get('total_seconds', 0):.0f} s")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
