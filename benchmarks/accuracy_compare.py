"""LoRA (all layers) vs LoRA + random sparse vs LoRA + IST on the commonsense mix, side by side.

    .venv/bin/python benchmarks/accuracy_compare.py                 # run what is missing, then report
    .venv/bin/python benchmarks/accuracy_compare.py --report_only   # rebuild the report from saved runs

Same data sample, data order, adapter init and steps for every strategy at a given seed;
each (strategy, seed) run is saved to ``<out>/runs/<strategy>-seed<k>.json`` as it ends, so
the benchmark resumes run by run across sessions; the untuned model's option scoring on the same
items is saved once to ``<out>/base.json``. Three measures:

1. held-out answer loss over training on a fixed held-out slice of the training mix
   (prompt tokens masked), every ``--curve_every`` steps;
2. accuracy by scoring each option's full text by log-likelihood;
3. accuracy under the LLM-Adapters generation protocol (greedy, answer-word extraction).

The report gives per-strategy means over the seeds every strategy has, paired differences (same
seed, same items) with 95% confidence intervals (t over seeds for the final held-out loss and its
mean over the last two thirds of training; for accuracies, t over items after averaging each
item's difference over the seeds), accuracy per task, and a plot of the loss curves with min-max
seed bands (the whole run, and after format learning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from istune import ISTCallback, ISTConfig
from istune.bench.records import git_commit, write_atomic
from istune.bench.stats import mean_ci95, paired_item_ci95
from istune.data import CausalLMCollator, InstructionDataset
from istune.eval import evaluate_tasks
from istune.eval.loss import heldout_loss
from istune.recipe.methods import AdapterArgs, add_adapters
from istune.recipe.models import load_model_and_tokenizer
from istune.recipe.options import parse_list
from istune.recipe.train import RunArgs, load_eval_items, load_rows

STRATEGIES = ("all", "random", "ist")
EVAL_SEED = 0  # the same evaluation items for every strategy and seed


class HeldoutCurve(TrainerCallback):
    """Held-out loss every ``every`` optimizer steps (and at step 0)."""

    def __init__(self, dataset, collate, every):
        self.dataset, self.collate, self.every, self.points = dataset, collate, every, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.points.append((0, heldout_loss(model, self.dataset, self.collate)))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.points.append((state.global_step, heldout_loss(model, self.dataset, self.collate)))


def run_one(strategy: str, seed: int, opts) -> dict:
    run = RunArgs(train_samples=opts.max_steps * opts.batch_size, heldout_samples=opts.heldout, eval_limit=opts.eval_limit)
    set_seed(seed)
    train_rows, heldout_rows = load_rows(run, seed)  # depends on the seed only: same for every strategy
    items = load_eval_items(opts.tasks.split(","), opts.eval_limit, EVAL_SEED)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    collate = CausalLMCollator(tokenizer)
    train_set = InstructionDataset(train_rows, tokenizer, opts.cutoff_len, train_on_inputs=False)
    heldout = InstructionDataset(heldout_rows, tokenizer, opts.cutoff_len, train_on_inputs=False)
    torch.manual_seed(seed)
    model = add_adapters(model, AdapterArgs(method="lora", rank=opts.rank, alpha=2 * opts.rank), opts.max_steps)
    ist = ISTConfig(strategy=strategy, seed=seed, mu=opts.mu)
    curve = HeldoutCurve(heldout, collate, opts.curve_every)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"istune-{strategy}-seed{seed}-"), max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size, learning_rate=opts.lr, lr_scheduler_type="linear",
        warmup_steps=opts.max_steps // 20, logging_steps=opts.max_steps, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
    )
    ist_callback = ISTCallback(ist)
    started = time.time()
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate,
            callbacks=[ist_callback, curve]).train()
    train_seconds = time.time() - started
    evaluated = evaluate_tasks(model, tokenizer, items, method=["score", "generate"], batch_size=8)
    return {
        "strategy": strategy, "seed": seed, "train_seconds": train_seconds, "curve": curve.points,
        "importance": ist_callback.importance.tolist(),
        "accuracy": _correct(evaluated), "options": vars(opts), "eval_seed": EVAL_SEED,
    }


def run_base(opts) -> dict:
    """The untuned model on the same items, by option scoring only (it never produces the answer format)."""
    items = load_eval_items(opts.tasks.split(","), opts.eval_limit, EVAL_SEED)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    evaluated = evaluate_tasks(model, tokenizer, items, method=["score"], batch_size=8)
    return {"strategy": "base", "accuracy": _correct(evaluated), "options": vars(opts), "eval_seed": EVAL_SEED}


def _correct(evaluated: dict) -> dict:
    """{method: {task: [correct per item]}} from ``evaluate_tasks``."""
    return {m: {t: [bool(r["correct"]) for r in recs] for t, recs in evaluated[m]["records"].items()} for m in evaluated}


def report(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not runs:
        raise FileNotFoundError(f"no saved runs in {out / 'runs'}; run the benchmark without --report_only first")
    by = {(r["strategy"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    strategies = [s for s in STRATEGIES if any((s, k) in by for k in seeds)]
    seeds = [k for k in seeds if all((s, k) in by for s in strategies)]  # compare means over the same seeds
    left_out = sorted(f"{s}-seed{k}" for s, k in by if k not in seeds)
    lines = [f"Means over {_seeds(seeds)} ± 95% CI"
             + (f"; runs without every strategy left out: {', '.join(left_out)}" if left_out else "") + ".", "",
             "| strategy | seeds | final held-out loss | option-scoring acc. (%) | generation acc. (%) | train s/run (wall clock, shared machine) |",
             "|---|---|---|---|---|---|"]
    for s in strategies:
        rs = [by[(s, k)] for k in seeds]
        loss = mean_ci95([r["curve"][-1][1] for r in rs])
        acc = {m: mean_ci95([100 * statistics.fmean(sum(r["accuracy"][m].values(), [])) for r in rs]) for m in ("score", "generate")}
        lines.append(f"| {s} | {len(rs)} | {loss[0]:.4f} ± {loss[1]:.4f} | {acc['score'][0]:.1f} ± {acc['score'][1]:.1f} | "
                     f"{acc['generate'][0]:.1f} ± {acc['generate'][1]:.1f} | {statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
    lines += ["", "Paired differences (same seed, same items), 95% CI: held-out loss over seeds; accuracies over "
              "the items, each item's difference averaged over the seeds first.", "",
              "| comparison | seeds | Δ final held-out loss | Δ held-out loss, mean of the last two thirds | "
              "Δ option-scoring acc. (pp) | Δ generation acc. (pp) |", "|---|---|---|---|---|---|"]
    for a, b in (("ist", "all"), ("ist", "random"), ("random", "all")):
        pairs = [(by[(a, k)], by[(b, k)]) for k in seeds if (a, k) in by and (b, k) in by]
        if not pairs:
            continue
        dl = mean_ci95([x["curve"][-1][1] - y["curve"][-1][1] for x, y in pairs])
        dm = mean_ci95([_late_mean(x["curve"]) - _late_mean(y["curve"]) for x, y in pairs])
        da = {}
        for m in ("score", "generate"):
            da[m] = paired_item_ci95([[100 * (int(u) - int(v)) for t in x["accuracy"][m]
                                       for u, v in zip(x["accuracy"][m][t], y["accuracy"][m][t])] for x, y in pairs])
        lines.append(f"| {a} − {b} | {len(pairs)} | {dl[0]:+.4f} ± {dl[1]:.4f} | {dm[0]:+.4f} ± {dm[1]:.4f} | {da['score'][0]:+.1f} ± {da['score'][1]:.1f} | "
                     f"{da['generate'][0]:+.1f} ± {da['generate'][1]:.1f} |")
    lines += ["", *_per_task_table(out, by, seeds, strategies)]
    _plot(out, by, seeds, strategies)
    return "\n".join(lines)


def _per_task_table(out: Path, by, seeds, strategies) -> list[str]:
    """Accuracy per task (means over ``seeds``), beside the untuned model's option scoring when saved."""
    base_file = out / "base.json"
    base = json.loads(base_file.read_text())["accuracy"]["score"] if base_file.exists() else None
    columns = ([("base", "score")] if base else []) + [(s, m) for m in ("score", "generate") for s in strategies]
    names = {"score": "option scoring", "generate": "generation"}
    lines = ["Accuracy per task (%), means over the same seeds" + ("; base = the untuned model, option scoring only "
             "(it never produces the answer format)" if base else "; no base.json saved") + ":", "",
             "| task | " + " | ".join(f"{s} ({names[m]})" for s, m in columns) + " |", "|---|" + "---|" * len(columns)]
    first = by[(strategies[0], seeds[0])]["accuracy"]["score"]
    if base and {t: len(c) for t, c in base.items()} != {t: len(c) for t, c in first.items()}:
        raise ValueError(f"{base_file} scored other items than the runs (another --tasks or --eval_limit); delete it "
                         "and run the benchmark again to rescore the base model")
    for task in [*first, "average"]:
        cells = []
        for s, m in columns:
            runs = [base] if s == "base" else [by[(s, k)]["accuracy"][m] for k in seeds]
            correct = [c for acc in runs for t in (first if task == "average" else [task]) for c in acc[t]]
            cells.append(f"{100 * statistics.fmean(correct):.1f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _seeds(seeds: list[int]) -> str:
    return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def _late_mean(curve) -> float:
    """Mean held-out loss over the points in the last two thirds of training, past format learning."""
    return statistics.fmean(loss for step, loss in curve if step >= curve[-1][0] / 3)


def _plot(out: Path, by, seeds, strategies) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (whole, late) = plt.subplots(1, 2, figsize=(11, 4))
    for s in strategies:
        curves = [by[(s, k)]["curve"] for k in seeds]
        steps = [p[0] for p in curves[0]]
        values = [[c[i][1] for c in curves] for i in range(len(steps))]
        late_from = next(i for i, step in enumerate(steps) if step >= steps[-1] / 3)  # as in _late_mean
        label = f"LoRA {'(all layers)' if s == 'all' else '+ ' + s}"
        for axis, first in ((whole, 0), (late, late_from)):
            axis.plot(steps[first:], [statistics.fmean(v) for v in values[first:]], marker=".", label=label)
            axis.fill_between(steps[first:], [min(v) for v in values[first:]], [max(v) for v in values[first:]], alpha=0.2)
    whole.set_yscale("log")  # format learning drops the loss 20-fold first; the strategies differ after it
    whole.set(xlabel="optimizer step", ylabel="held-out answer loss (log scale)", title="whole run")
    late.set(xlabel="optimizer step", ylabel="held-out answer loss", title="after format learning (last two thirds)")
    late.legend()
    figure.suptitle(f"SmolLM2-135M, commonsense mix: mean and min-max over {_seeds(seeds)}")
    figure.tight_layout()
    tmp = out / ".loss_curves.tmp.png"
    figure.savefig(tmp, dpi=120)
    os.replace(tmp, out / "loss_curves.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/accuracy")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--mu", type=float, default=10.0)
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--curve_every", type=int, default=25)
    parser.add_argument("--tasks", default="boolq,piqa,social_i_qa,hellaswag,winogrande,ARC-Easy,ARC-Challenge,openbookqa")
    parser.add_argument("--eval_limit", type=int, default=50)
    parser.add_argument("--report_only", action="store_true")
    opts = parser.parse_args(argv)
    try:
        strategies = parse_list("strategies", opts.strategies, allowed=STRATEGIES)
        seeds = parse_list("seeds", opts.seeds, int)
    except ValueError as error:
        parser.error(str(error))
    out = Path(opts.out)
    commit = git_commit(Path(__file__).resolve().parent.parent)  # before this run writes into the tree
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not opts.report_only:
        if not (out / "base.json").exists():
            print("== base model (no tuning), option scoring", flush=True)
            write_atomic(out / "base.json", json.dumps(run_base(opts)))
        for seed in seeds:
            for strategy in strategies:
                path = out / "runs" / f"{strategy}-seed{seed}.json"
                if path.exists():
                    continue
                print(f"== {strategy} seed {seed}", flush=True)
                result = run_one(strategy, seed, opts)
                write_atomic(path, json.dumps(result))
    table = report(out)
    header = (f"# LoRA vs LoRA+random vs LoRA+IST, SmolLM2-135M, commonsense mix\n\n"
              f"Command: `.venv/bin/python benchmarks/accuracy_compare.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n"
              f"Commit: {commit}; "
              f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    write_atomic(out / "results.md", header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
