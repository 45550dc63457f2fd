"""Time of the evaluation parts that changed: option scoring (context shared or not) and the held-out loss.

    python -m istune.bench.eval_time                    # SmolLM2-135M, 8 items per task, all eight tasks
    python -m istune.bench.eval_time --items 16 --tasks boolq,piqa --rounds 2
    python -m istune.bench.eval_time --count_only --items 24   # work counted, not timed (a busy machine)

Each round times, per task, option scoring pair by pair (``share_context=False``,
the old path) and with each context run once (the new default), in alternating order,
then the held-out loss of the main job's 64 held-out examples over every position
(the old path) and over labelled positions only. A slow spell of a shared machine
hits old and new alike. Also checked: the same predictions and the largest log-prob
difference. Results go to ``benchmarks/results/eval_time.{json,md}``.

``--count_only`` counts instead of timing (deterministic, for a machine too busy to time
on): positions through the decoder layers (padding included) and positions projected onto
the vocabulary, old and new, and the ratio of multiply-adds they imply for the model.
Written to ``benchmarks/results/eval_work.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

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


def _timed(function) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def full_positions_loss(model, examples, collate, batch_size: int) -> float:
    """The held-out loss as computed before: logits at every position, -100 ignored."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            tokens += int((targets != -100).sum())
    return total / tokens


def measure(opts: argparse.Namespace, progress=print) -> dict[str, Any]:
    from istune.config import ISTConfig
    from istune.data import CausalLMCollator, InstructionDataset
    from istune.eval.loss import heldout_loss
    from istune.eval.scoring import evaluate_scoring
    from istune.eval.tasks import parse_eval_tasks
    from istune.planning.step import load_model_and_tokenizer
    from istune.data import load_eval_items
    from istune.runs import RunArgs, load_rows

    tasks = parse_eval_tasks(opts.tasks)
    items = load_eval_items(tasks, opts.items, seed=0)
    model, tokenizer = load_model_and_tokenizer(opts.model)
    model.eval()
    _, heldout_rows = load_rows(RunArgs(), ISTConfig().seed)
    heldout = InstructionDataset(heldout_rows, tokenizer, RunArgs().cutoff_len, train_on_inputs=False)
    collate = CausalLMCollator(tokenizer)
    times: dict[str, dict[str, list[float]]] = {task: {"pairwise": [], "shared": []} for task in tasks}
    times["heldout_loss"] = {"pairwise": [], "shared": []}  # all positions / labelled positions
    checks: dict[str, Any] = {}
    generated: dict[int, list] = {}
    for round_index in range(opts.rounds):
        for task in tasks:
            order = ["pairwise", "shared"] if round_index % 2 == 0 else ["shared", "pairwise"]
            results = {}
            for variant in order:
                seconds, results[variant] = _timed(lambda: evaluate_scoring(
                    model, tokenizer, items[task], task, batch_size=opts.batch_size,
                    share_context=variant == "shared"))
                times[task][variant].append(seconds)
            old, new = results["pairwise"].records, results["shared"].records
            checks[task] = {
                "same_predictions": all(o["prediction"] == n["prediction"] and
                                        o["prediction_per_char"] == n["prediction_per_char"] for o, n in zip(old, new)),
                "max_logprob_difference": max(abs(a - b) for o, n in zip(old, new)
                                              for a, b in zip(o["logprobs"], n["logprobs"])),
            }
            progress(f"{task}: pairwise {times[task]['pairwise'][-1]:.1f} s, shared {times[task]['shared'][-1]:.1f} s")
        if opts.generate_task:  # the generation budget: LLM-Adapters' 32 new tokens against a fitted one
            from istune.eval.generation import evaluate_generation

            task = opts.generate_task
            for budget in (32, opts.fitted_budget):
                seconds, result = _timed(lambda: evaluate_generation(model, tokenizer, items[task], task,
                                                                    batch_size=opts.batch_size, max_new_tokens=budget))
                times.setdefault(f"generate {task}", {"pairwise": [], "shared": []})
                generated[budget] = result.records
                times[f"generate {task}"]["pairwise" if budget == 32 else "shared"].append(seconds)
                progress(f"generate {task}, {budget} new tokens: {seconds:.1f} s")
            checks["generate"] = {"same_predictions": all(a["prediction"] == b["prediction"] for a, b in
                                                         zip(generated[32], generated[opts.fitted_budget])),
                                  "responses_32": [r["response"] for r in generated[32]]}
        seconds_full, full = _timed(lambda: full_positions_loss(model, heldout, collate, opts.batch_size))
        seconds_kept, kept = _timed(lambda: heldout_loss(model, heldout, collate, opts.batch_size))
        times["heldout_loss"]["pairwise"].append(seconds_full)
        times["heldout_loss"]["shared"].append(seconds_kept)
        checks["heldout_loss"] = {"all_positions": full, "labelled_positions": kept}
        progress(f"held-out loss: all positions {seconds_full:.1f} s, labelled positions {seconds_kept:.1f} s")
    rows = {name: {"old_s": statistics.median(t["pairwise"]), "new_s": statistics.median(t["shared"])}
            for name, t in times.items()}
    for row in rows.values():
        row["ratio"] = row["new_s"] / row["old_s"]
    return {"rows": rows, "checks": checks, "times": times,
            "settings": {"model": opts.model, "tasks": tasks, "items": opts.items, "batch_size": opts.batch_size,
                         "rounds": opts.rounds, "heldout_examples": len(heldout),
                         "fitted_budget": opts.fitted_budget}}


def count_work(opts: argparse.Namespace) -> dict[str, Any]:
    """Positions through the body and through the vocabulary projection, old and new (see the module doc)."""
    from istune.config import ISTConfig
    from istune.data import InstructionDataset
    from istune.eval.scoring import encode_option
    from istune.eval.tasks import parse_eval_tasks
    from istune.planning.step import load_model_and_tokenizer
    from istune.data import load_eval_items
    from istune.runs import RunArgs, load_rows

    model, tokenizer = load_model_and_tokenizer(opts.model)
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    batch_size = opts.batch_size
    rows: dict[str, dict[str, Any]] = {}
    for task, rows_of_task in load_eval_items(parse_eval_tasks(opts.tasks), opts.items, seed=0).items():
        encoded = [encode_option(tokenizer, item["context"], option, " ") for item in rows_of_task for option in item["options"]]
        order = sorted(encoded, key=lambda e: -(len(e[0]) + len(e[1])))
        old = sum(len(order[s:s + batch_size]) * (len(order[s][0]) + len(order[s][1]))
                  for s in range(0, len(order), batch_size))
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
    _, heldout_rows = load_rows(RunArgs(), ISTConfig().seed)
    examples = InstructionDataset(heldout_rows, tokenizer, RunArgs().cutoff_len, train_on_inputs=False)
    examples = [examples[i] for i in range(len(examples))]
    padded = sum(len(examples[s:s + batch_size]) * max(len(e["input_ids"]) for e in examples[s:s + batch_size])
                 for s in range(0, len(examples), batch_size))
    labelled = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    rows["held-out loss"] = {"old_body": padded, "old_vocab": padded, "new_body": padded, "new_vocab": labelled}
    scoring = [r for name, r in rows.items() if name.startswith("score")]
    rows["all scoring"] = {key: sum(r[key] for r in scoring) for key in ("old_body", "old_vocab", "new_body", "new_vocab")}
    for row in rows.values():
        row["ratio"] = (body * row["new_body"] + head * row["new_vocab"]) / (body * row["old_body"] + head * row["old_vocab"])
    return {"rows": rows, "settings": {"model": opts.model, "items": opts.items, "batch_size": batch_size,
                                       "body_parameters": body, "vocab_projection_parameters": head}}


def format_counts(result: dict[str, Any], meta: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        "# Evaluation work: option scoring with shared contexts, held-out loss on labelled positions",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}.",
        "",
        f"{settings['model']}, {settings['items']} items per task (eval seed 0, as the main job), batch size "
        f"{settings['batch_size']}. Counted, not timed: token positions through the decoder layers (padding "
        "included) and positions projected onto the vocabulary. The ratio weighs them by the multiply-adds per "
        f"position ({settings['body_parameters'] / 1e6:.1f} M in the layers, "
        f"{settings['vocab_projection_parameters'] / 1e6:.1f} M in the vocabulary projection); on a CPU, "
        "where these passes are compute-bound, time follows it.",
        "",
        "| part | layer positions old | new | vocab positions old | new | work new / old |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['old_body']} | {row['new_body']} | {row['old_vocab']} | {row['new_vocab']} | "
                     f"{row['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def format_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        "# Evaluation time: option scoring with shared contexts, held-out loss on labelled positions",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}; {meta['machine']}.",
        "",
        f"{settings['model']}, {settings['items']} items per task (eval seed 0), batch size {settings['batch_size']}, "
        f"{settings['rounds']} interleaved round(s), medians. Old = one sequence per (context, option) pair / "
        "logits at every position; new = each context once with its KV cache copied per option / logits only "
        "where a label is.",
        "",
        "| part | old (s) | new (s) | new / old | same predictions | max abs log-prob diff |",
        "|---|---:|---:|---:|:---:|---:|",
    ]
    for name, row in result["rows"].items():
        if name.startswith("generate"):
            continue
        check = result["checks"][name]
        if name == "heldout_loss":
            same = f"{check['all_positions']:.6f} vs {check['labelled_positions']:.6f}"
            lines.append(f"| held-out loss ({settings['heldout_examples']} ex.) | {row['old_s']:.1f} | {row['new_s']:.1f} "
                         f"| {row['ratio']:.2f} | {same} | |")
        else:
            lines.append(f"| score {name} | {row['old_s']:.1f} | {row['new_s']:.1f} | {row['ratio']:.2f} | "
                         f"{'yes' if check['same_predictions'] else 'NO'} | {check['max_logprob_difference']:.1e} |")
    generate = [(name, row) for name, row in result["rows"].items() if name.startswith("generate")]
    if generate:
        name, row = generate[0]
        same = result["checks"]["generate"]["same_predictions"]
        lines += ["", f"Generation ({name}, untuned model): 32 new tokens {row['old_s']:.1f} s, "
                      f"{settings['fitted_budget']} new tokens {row['new_s']:.1f} s ({row['ratio']:.2f}); "
                      f"same predictions: {'yes' if same else 'NO'}. Not changed in the recipe (see the report)."]
    scoring = [row for name, row in result["rows"].items() if name != "heldout_loss" and not name.startswith("generate")]
    old, new = sum(r["old_s"] for r in scoring), sum(r["new_s"] for r in scoring)
    lines += ["", f"All scoring: {old:.1f} s -> {new:.1f} s ({new / old:.2f} of the time)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m istune.bench.eval_time``: time old and new scoring and held-out loss, print and write ``--out``.json/.md."""
    from istune.bench.records import run_metadata, write_record
    from istune.options import require_at_least_one

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
