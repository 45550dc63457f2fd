"""Time of the evaluation parts that changed: option scoring (context shared or not) and the held-out loss.

    python -m istune.bench.eval_time                    # SmolLM2-135M, 8 items per task, all eight tasks
    python -m istune.bench.eval_time --items 16 --tasks boolq,piqa --rounds 2
    python -m istune.bench.eval_time --count_only --items 24   # work counted, not timed (a busy machine)

Each round times, per task, option scoring pair by pair (``share_context=False``, the old path) and with
each context run once, in alternating order, then the held-out loss of the main job's held-out examples
over every position (old) and over labelled positions only (new); predictions and log-probs are checked
equal. ``--count_only`` counts positions through the decoder layers and through the vocabulary projection
instead, and the multiply-adds they imply (to ``benchmarks/results/eval_work``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = "benchmarks/results/eval_time"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m istune.bench.eval_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="Hub id, local folder or 'smollm2-135m'.")
    parser.add_argument("--tasks", default="all", help="Commonsense tasks ('all' or comma-separated).")
    parser.add_argument("--items", type=int, default=8, help="Items per task (seeded sample, eval seed 0).")
    parser.add_argument("--batch_size", type=int, default=8, help="Evaluation batch size (the recipe's default).")
    parser.add_argument("--rounds", type=int, default=1, help="Interleaved rounds; medians are reported.")
    parser.add_argument("--generate_task", default=None, help="Also time generation on this task: 32 new tokens "
                        "(LLM-Adapters) against --fitted_budget, on the untuned model.")
    parser.add_argument("--fitted_budget", type=int, default=16, help="The shorter generation budget.")
    parser.add_argument("--count_only", action="store_true", help="Count positions instead of timing (see above).")
    parser.add_argument("--out", default=DEFAULT_OUT, help="Output path without suffix (.json and .md are written).")
    return parser.parse_args(argv)


def _setup(opts: argparse.Namespace):
    """The model, tokenizer, evaluation items and the main job's held-out examples."""
    from istune.config import ISTConfig
    from istune.data import InstructionDataset, load_eval_items
    from istune.eval.tasks import parse_eval_tasks
    from istune.models import load_model_and_tokenizer
    from istune.runs import RunArgs, load_rows

    model, tokenizer = load_model_and_tokenizer(opts.model)
    items = load_eval_items(parse_eval_tasks(opts.tasks), opts.items, seed=0)
    heldout = InstructionDataset(load_rows(RunArgs(), ISTConfig().seed)[1], tokenizer, RunArgs().cutoff_len,
                                 train_on_inputs=False)
    return model.eval(), tokenizer, items, heldout


def full_positions_loss(model, examples, collate, batch_size: int) -> float:
    """The held-out loss as computed before: logits at every position, -100 ignored."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    return total / tokens


def measure(opts: argparse.Namespace, progress=print) -> dict[str, Any]:
    """Old ("pairwise") and new ("shared") times of every part, per round; their medians and the checks."""
    from istune.data import CausalLMCollator
    from istune.eval.generation import evaluate_generation
    from istune.eval.loss import heldout_loss
    from istune.eval.scoring import evaluate_scoring

    model, tokenizer, items, heldout = _setup(opts)
    collate = CausalLMCollator(tokenizer)
    parts: dict[str, Any] = {task: lambda old, task=task: evaluate_scoring(
        model, tokenizer, items[task], task, batch_size=opts.batch_size, share_context=not old) for task in items}
    if opts.generate_task:  # LLM-Adapters' 32 new tokens against a fitted budget
        task = opts.generate_task
        parts[f"generate {task}"] = lambda old: evaluate_generation(
            model, tokenizer, items[task], task, batch_size=opts.batch_size,
            max_new_tokens=32 if old else opts.fitted_budget)
    parts["heldout_loss"] = lambda old: (full_positions_loss if old else heldout_loss)(
        model, heldout, collate, opts.batch_size)
    times = {name: {"pairwise": [], "shared": []} for name in parts}
    checks: dict[str, Any] = {}
    for round_index in range(opts.rounds):
        for name, run in parts.items():
            results = {}
            for variant in ("pairwise", "shared")[:: 1 if round_index % 2 == 0 else -1]:
                started = time.perf_counter()
                results[variant] = run(variant == "pairwise")
                times[name][variant].append(time.perf_counter() - started)
            old, new = results["pairwise"], results["shared"]
            if name == "heldout_loss":
                checks[name] = {"all_positions": old, "labelled_positions": new}
            elif name.startswith("generate"):
                checks["generate"] = {"same_predictions": all(a["prediction"] == b["prediction"]
                                                              for a, b in zip(old.records, new.records)),
                                      "responses_32": [r["response"] for r in old.records]}
            else:
                checks[name] = {
                    "same_predictions": all(o["prediction"] == n["prediction"] and o["prediction_per_char"] ==
                                            n["prediction_per_char"] for o, n in zip(old.records, new.records)),
                    "max_logprob_difference": max(abs(a - b) for o, n in zip(old.records, new.records)
                                                  for a, b in zip(o["logprobs"], n["logprobs"]))}
            progress(f"{name}: old {times[name]['pairwise'][-1]:.1f} s, new {times[name]['shared'][-1]:.1f} s")
    rows = {name: {"old_s": statistics.median(t["pairwise"]), "new_s": statistics.median(t["shared"])}
            for name, t in times.items()}
    for row in rows.values():
        row["ratio"] = row["new_s"] / row["old_s"]
    return {"rows": rows, "checks": checks, "times": times,
            "settings": {"model": opts.model, "tasks": list(items), "items": opts.items, "batch_size": opts.batch_size,
                         "rounds": opts.rounds, "heldout_examples": len(heldout),
                         "fitted_budget": opts.fitted_budget}}


def _padded(lengths: list[int], batch_size: int) -> int:
    """Positions of ``lengths`` in batches of ``batch_size``, each padded to its longest."""
    return sum(len(lengths[s:s + batch_size]) * max(lengths[s:s + batch_size])
               for s in range(0, len(lengths), batch_size))


def count_work(opts: argparse.Namespace) -> dict[str, Any]:
    """Positions through the body and through the vocabulary projection, old and new (see the module doc)."""
    from istune.eval.scoring import encode_option

    model, tokenizer, items, heldout = _setup(opts)
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    batch_size = opts.batch_size
    rows: dict[str, dict[str, Any]] = {}
    for task, task_items in items.items():
        encoded = [encode_option(tokenizer, item["context"], option, " ") for item in task_items
                   for option in item["options"]]
        old = _padded(sorted((len(c) + len(o) for c, o, _ in encoded), reverse=True), batch_size)
        groups: dict[tuple, list] = {}
        for context, option, _ in encoded:
            groups.setdefault(tuple(context), []).append(option)
        ordered = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(map(len, g[1]))))
        new_body = new_head = 0
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start:start + batch_size]
            new_body += len(batch) * max(len(context) for context, _ in batch)
            new_head += len(batch)
            options = [option for _, options_of in batch for option in options_of]
            if max(map(len, options)) > 1:
                new_body += len(options) * max(map(len, options))
                new_head += sum(len(option) - 1 for option in options)
        rows[f"score {task}"] = {"old_body": old, "old_vocab": old, "new_body": new_body, "new_vocab": new_head}
    examples = [heldout[i] for i in range(len(heldout))]
    padded = _padded([len(e["input_ids"]) for e in examples], batch_size)
    labelled = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    rows["held-out loss"] = {"old_body": padded, "old_vocab": padded, "new_body": padded, "new_vocab": labelled}
    keys = ("old_body", "old_vocab", "new_body", "new_vocab")
    rows["all scoring"] = {k: sum(r[k] for n, r in rows.items() if n.startswith("score")) for k in keys}
    for row in rows.values():
        row["ratio"] = ((body * row["new_body"] + head * row["new_vocab"])
                        / (body * row["old_body"] + head * row["old_vocab"]))
    return {"rows": rows, "settings": {"model": opts.model, "items": opts.items, "batch_size": batch_size,
                                       "body_parameters": body, "vocab_projection_parameters": head}}


def format_counts(result: dict[str, Any], meta: dict[str, Any]) -> str:
    from istune.bench.records import markdown_table

    settings = result["settings"]
    table = markdown_table(["part", "layer positions old", "new", "vocab positions old", "new", "work new / old"],
                           ([name, r["old_body"], r["new_body"], r["old_vocab"], r["new_vocab"], f"{r['ratio']:.2f}"]
                            for name, r in result["rows"].items()))
    return (f"# Evaluation work: option scoring with shared contexts, held-out loss on labelled positions\n\n"
            f"Command: `{meta['command']}`  \nDate: {meta['date']}; commit {meta['commit']}.\n\n"
            f"{settings['model']}, {settings['items']} items per task (eval seed 0, as the main job), batch size "
            f"{settings['batch_size']}. Counted, not timed: token positions through the decoder layers (padding "
            "included) and positions projected onto the vocabulary. The ratio weighs them by the multiply-adds per "
            f"position ({settings['body_parameters'] / 1e6:.1f} M in the layers, "
            f"{settings['vocab_projection_parameters'] / 1e6:.1f} M in the vocabulary projection); on a CPU, "
            f"where these passes are compute-bound, time follows it.\n\n{table}\n")


def format_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    from istune.bench.records import markdown_table

    settings, checks, cells = result["settings"], result["checks"], []
    for name, row in result["rows"].items():
        times = [f"{row['old_s']:.1f}", f"{row['new_s']:.1f}", f"{row['ratio']:.2f}"]
        if name == "heldout_loss":
            check = checks[name]
            cells.append([f"held-out loss ({settings['heldout_examples']} ex.)", *times,
                          f"{check['all_positions']:.6f} vs {check['labelled_positions']:.6f}", ""])
        elif not name.startswith("generate"):
            cells.append([f"score {name}", *times, "yes" if checks[name]["same_predictions"] else "NO",
                          f"{checks[name]['max_logprob_difference']:.1e}"])
    text = (f"# Evaluation time: option scoring with shared contexts, held-out loss on labelled positions\n\n"
            f"Command: `{meta['command']}`  \nDate: {meta['date']}; commit {meta['commit']}; {meta['machine']}.\n\n"
            f"{settings['model']}, {settings['items']} items per task (eval seed 0), batch size "
            f"{settings['batch_size']}, {settings['rounds']} interleaved round(s), medians. Old = one sequence per "
            "(context, option) pair / logits at every position; new = each context once with its KV cache copied "
            "per option / logits only where a label is.\n\n"
            + markdown_table(["part", "old (s)", "new (s)", "new / old", "same predictions", "max abs log-prob diff"],
                             cells, "lrrrcr") + "\n")
    for name, row in result["rows"].items():
        if name.startswith("generate"):
            same = "yes" if checks["generate"]["same_predictions"] else "NO"
            text += (f"\nGeneration ({name}, untuned model): 32 new tokens {row['old_s']:.1f} s, "
                     f"{settings['fitted_budget']} new tokens {row['new_s']:.1f} s ({row['ratio']:.2f}); "
                     f"same predictions: {same}. Not changed in the recipe (see the report).\n")
    scoring = [r for name, r in result["rows"].items() if "max_logprob_difference" in checks.get(name, {})]
    old, new = sum(r["old_s"] for r in scoring), sum(r["new_s"] for r in scoring)
    return text + f"\nAll scoring: {old:.1f} s -> {new:.1f} s ({new / old:.2f} of the time).\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m istune.bench.eval_time``: time (or count) old and new, print and write ``--out``.json/.md."""
    from istune.bench.records import run_metadata, write_record
    from istune.option_checks import require_at_least_one

    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    require_at_least_one(opts, ("items", "batch_size", "rounds"))
    meta = run_metadata("-m istune.bench.eval_time", argv)
    if opts.count_only:
        result = count_work(opts)
        markdown = format_counts(result, meta)
        if opts.out == DEFAULT_OUT:
            opts.out = "benchmarks/results/eval_work"
    else:
        result = measure(opts, progress=lambda text: print(text, flush=True))
        markdown = format_markdown(result, meta)
    print(markdown)
    write_record(Path(opts.out), {"meta": meta, **result}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
