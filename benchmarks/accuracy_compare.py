"""LoRA on every layer vs random sparse vs IST arms on the commonsense mix, side by side, over seeds.

For a new comparison use ``istune compare`` (docs/compare.md): any model and data, any arms, learning
curves, the same resume and refusal of mixed runs. This script stays as the command behind the committed
records of ``benchmarks/results/accuracy*`` (issues 20-24), which ``--report_only`` rebuilds from their
saved runs unchanged.

    .venv/bin/python benchmarks/accuracy_compare.py                 # run what is missing, then report
    .venv/bin/python benchmarks/accuracy_compare.py --report_only   # rebuild the report from saved runs

The arms (``--arms``): ``all`` trains LoRA on every layer; ``random`` N_u of N_L layers drawn
uniformly each step; ``ist`` IST as in the paper (T_c = 10, μ = ``--mu``); ``ist-tc2`` IST
with T_c = 2, so that 300 steps make 150 importance updates; ``ist-spread`` the same with
the μ-free rewards (``ISTConfig(reward_scale="spread")``, μ = ``--spread_mu``). N_u = 25% of
N_L, N_v = 50%, N_c = 3, β = 0.25 in every sparse arm. ``ist-tc2-mu100`` is ``ist-tc2`` at the
paper's μ for math (100); it is run with ``--train_only`` (no held-out curve, no evaluation, no
report), for the importance it learns during training:

    .venv/bin/python benchmarks/accuracy_compare.py --arms ist-tc2-mu100 --train_only --out <folder>

The peers' selection rules (issue 24; their settings and the reasons for each K in
``benchmarks/results/accuracy-rules/PROTOCOL.md``), with the same N_u: ``lisa`` N_u layers uniformly,
held K = 20 steps; ``badam`` blocks of N_u consecutive layers in ascending order, switched every
K = 25 steps; ``owlore`` N_u layers in proportion to their outlier ratios (M = 13, measured once),
re-drawn every K = 25 steps; ``gradnorm`` N_u layers by a running estimate of their adapter-gradient
norm (ε = 0.1, γ = 0.9), re-drawn every step; ``probe-once`` the N_u layers with the largest
adapter-gradient norms at step 0, then always those.

Same data sample, data order, adapter init and steps for every arm at a given seed; training
batches are packed and project only the labelled positions onto the vocabulary, as
``istune train`` does (``batch_layout``: the same loss, half the time). The runs go seed by
seed (every arm of seed 1, then seed 2, ...); each (arm, seed) run keeps its folder
``<out>/runs/<arm>-seed<k>/`` (the IST log ``ist_log.jsonl``, for ``istune analyze
reproducibility --logs``) and is saved to ``<out>/runs/<arm>-seed<k>.json`` as it ends, so the
benchmark resumes run by run across sessions; a saved run made with other options is refused,
not mixed in. The untuned model's option scoring on the same items is saved once to
``<out>/base.json``. Three measures:

1. held-out answer loss over training on a fixed held-out slice of the training mix
   (prompt tokens masked), every ``--curve_every`` steps;
2. accuracy by scoring each option's full text by log-likelihood;
3. accuracy under the LLM-Adapters generation protocol (greedy, answer-word extraction).

The report gives per-arm means over the seeds every arm has, paired differences (same seed,
same items) with 95% confidence intervals (t over seeds for the final held-out loss and its
mean over the last two thirds of training; for accuracies, t over items after averaging each
item's difference over the seeds), each accuracy difference's spread over seeds with the seeds a
paired test would need to detect +1.8 pp, accuracy per task, and a plot of the loss curves with
min-max seed bands (the whole run, and after format learning).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from istune import ISTCallback, ISTConfig, rule_catalog
from istune.adapters.methods import AdapterArgs, add_adapters
from istune.bench.stats import mean_ci95, paired_item_ci95, seeds_for_power
from istune.data import CausalLMCollator, InstructionDataset, load_eval_items
from istune.data.commonsense_format import COMMONSENSE_TASKS
from istune.eval import evaluate_tasks
from istune.eval.loss import heldout_loss
from istune.integrations.hf import LOG_FILE
from istune.io import git_commit, repo_relative, write_text
from istune.models import load_model_and_tokenizer
from istune.option_checks import parse_list, require_at_least_one
from istune.runs import RunArgs, batch_layout, load_rows

ARMS = {  # name -> legend; the settings are in arm_config
    "all": "LoRA, every layer",
    "random": "LoRA + random sparse",
    "ist": "LoRA + IST, T_c = 10",
    "ist-tc2": "LoRA + IST, T_c = 2",
    "ist-spread": "LoRA + IST, T_c = 2, spread-scaled rewards",
    "ist-tc2-mu100": "LoRA + IST, T_c = 2, μ = 100 (for the reproducibility study: run with --train_only)",
    "lisa": "LoRA + LISA: uniform, held K steps (Pan et al. 2024)",
    "badam": "LoRA + BAdam's order: blocks of N_u consecutive layers, ascending (Luo et al. 2024)",
    "owlore": "LoRA + OwLore: sampled by outlier ratio (Li et al. 2024)",
    "gradnorm": "LoRA + gradient norm: sampled by a running adapter-gradient norm (after MISA 2025, GRASS 2026)",
    "probe-once": "LoRA + one-time probe: the largest gradient norms at step 0, then fixed (after Aletheia 2026)",
}
DEFAULT_ARMS = "all,random,ist,ist-tc2,ist-spread"
# The peers' rules (issue 24): each is compared with random layers and with LoRA on every layer.
RULE_ARMS = ("lisa", "badam", "owlore", "gradnorm", "probe-once")
# The paired differences reported, A − B, for the arms present.
PAIRS = (("ist", "all"), ("ist", "random"), ("random", "all"), ("ist-tc2", "all"), ("ist-tc2", "random"),
         ("ist-tc2", "ist"), ("ist-spread", "ist-tc2"), ("ist-spread", "random"),
         *((rule, other) for rule in RULE_ARMS for other in ("random", "all")))
# Options that shape a run: a saved run is reused only if it was made with the same values.
RUN_OPTIONS = ("max_steps", "batch_size", "lr", "rank", "cutoff_len", "heldout", "curve_every", "tasks", "eval_limit")
EVAL_SEED = 0  # the same evaluation items for every arm and seed
GENERATION_BATCH = RunArgs().generation_batch_size  # prompts per generate call, as `istune train`


def arm_config(arm: str, seed: int, opts) -> ISTConfig:
    """The ISTConfig of ``arm`` at ``seed``: ISTConfig's defaults (the paper's) except for these settings."""
    settings = {
        "all": {"strategy": "all"},
        "random": {"strategy": "random"},
        "ist": {"strategy": "ist", "probe_interval": 10, "mu": opts.mu},
        "ist-tc2": {"strategy": "ist", "probe_interval": 2, "mu": opts.mu},
        "ist-spread": {"strategy": "ist", "probe_interval": 2, "reward_scale": "spread", "mu": opts.spread_mu},
        "ist-tc2-mu100": {"strategy": "ist", "probe_interval": 2, "mu": 100.0},
        # K (switch_interval): the peers' defaults brought to a 300-step run; the reasons are in
        # benchmarks/results/accuracy-rules/PROTOCOL.md.
        "lisa": {"strategy": "lisa", "switch_interval": 20},  # LMFlow's lisa_interval_steps default
        "badam": {"strategy": "badam", "block_order": "ascending", "switch_interval": 25},  # 3 passes of 4 blocks
        "owlore": {"strategy": "owlore", "outlier_threshold": 13.0, "calibration_interval": 0, "switch_interval": 25},
        "gradnorm": {"strategy": "gradnorm", "exploration": 0.1, "gradnorm_decay": 0.9, "switch_interval": 1},
        "probe-once": {"strategy": "probe-once", "probe_by": "gradient"},
    }[arm]
    return ISTConfig(seed=seed, **settings)


class HeldoutCurve(TrainerCallback):
    """Held-out loss every ``every`` optimizer steps (and at step 0); ``seconds`` is the time it took."""

    def __init__(self, dataset, collate, every):
        self.dataset, self.collate, self.every, self.points, self.seconds = dataset, collate, every, [], 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(state.global_step, model)

    def _measure(self, step, model):
        started = time.time()
        self.points.append((step, heldout_loss(model, self.dataset, self.collate)))
        self.seconds += time.time() - started


def run_one(arm: str, seed: int, opts, folder: Path) -> dict:
    """Train ``arm`` at ``seed`` with ``folder`` as the Trainer's output (the IST log stays there); evaluate it."""
    run = RunArgs(train_samples=opts.max_steps * opts.batch_size, heldout_samples=opts.heldout)
    set_seed(seed)
    train_rows, heldout_rows = load_rows(run, seed)  # depends on the seed only: same for every arm
    items = load_eval_items(opts.tasks.split(","), opts.eval_limit, EVAL_SEED)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    # packed, labelled logits only: `istune train`'s batches, if the model takes them
    layout = batch_layout(RunArgs(), model)
    collate = CausalLMCollator(tokenizer, **layout)
    train_set = InstructionDataset(train_rows, tokenizer, opts.cutoff_len, train_on_inputs=False)
    heldout = InstructionDataset(heldout_rows, tokenizer, opts.cutoff_len, train_on_inputs=False)
    torch.manual_seed(seed)
    model = add_adapters(model, AdapterArgs(method="lora", rank=opts.rank, alpha=2 * opts.rank), opts.max_steps)
    ist = arm_config(arm, seed, opts)
    curve = HeldoutCurve(heldout, collate, opts.curve_every)
    args = TrainingArguments(
        output_dir=str(folder), max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size, learning_rate=opts.lr, lr_scheduler_type="linear",
        warmup_steps=opts.max_steps // 20, logging_steps=opts.max_steps, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
    )
    ist_callback = ISTCallback(ist)
    started = time.time()
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate,
            callbacks=[ist_callback] if opts.train_only else [ist_callback, curve]).train()
    train_seconds = time.time() - started
    updates, skipped = count_importance_updates(folder / LOG_FILE)
    if opts.train_only:
        return {"arm": arm, "strategy": ist.strategy, "seed": seed, "ist_config": ist.to_dict(), "train_only": True,
                "importance_updates": updates, "importance_updates_skipped": skipped, "batch_layout": layout,
                "train_seconds": train_seconds, "importance": ist_callback.importance.tolist(),
                "options": _recorded_options(opts)}
    accuracy, eval_seconds = {}, {}
    for method in ("score", "generate"):
        started = time.time()
        evaluated = evaluate_tasks(model, tokenizer, items, method=[method], batch_size=8,
                                   generation_batch_size=GENERATION_BATCH)
        eval_seconds[method] = time.time() - started
        accuracy.update(_correct(evaluated))
        if method == "generate":  # the text behind each verdict; prediction None: no answer word in it
            records = evaluated[method]["records"]
            generated = {key: {task: [r[key] for r in records[task]] for task in records}
                         for key in ("response", "prediction")}
    return {
        "arm": arm, "strategy": ist.strategy, "seed": seed, "ist_config": ist.to_dict(),
        "importance_updates": updates, "importance_updates_skipped": skipped, "batch_layout": layout,
        "train_seconds": train_seconds, "curve_seconds": curve.seconds, "eval_seconds": eval_seconds,
        "curve": curve.points, "importance": ist_callback.importance.tolist(),
        "accuracy": accuracy, "generated": generated, "options": _recorded_options(opts), "eval_seed": EVAL_SEED,
    }


def count_importance_updates(log: Path) -> tuple[int, int]:
    """(importance updates made, updates skipped for a non-finite probe loss): the probe events of an IST log."""
    if not log.is_file():
        return 0, 0
    probes = [event for event in map(json.loads, log.read_text().splitlines()) if event.get("event") == "probe"]
    skipped = sum(1 for event in probes if event.get("skipped"))
    return len(probes) - skipped, skipped


def run_base(opts) -> dict:
    """The untuned model on the same items, by option scoring only (it never produces the answer format)."""
    items = load_eval_items(opts.tasks.split(","), opts.eval_limit, EVAL_SEED)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    evaluated = evaluate_tasks(model, tokenizer, items, method=["score"], batch_size=8)
    return {"strategy": "base", "accuracy": _correct(evaluated), "options": _recorded_options(opts),
            "eval_seed": EVAL_SEED}


def _correct(evaluated: dict) -> dict:
    """{method: {task: [correct per item]}} from ``evaluate_tasks``."""
    return {m: {t: [bool(r["correct"]) for r in recs] for t, recs in evaluated[m]["records"].items()}
            for m in evaluated}


# ---- report ----------------------------------------------------------------------------------


def _arm(run: dict) -> str:
    """The arm of a saved run; runs saved before arms existed name their strategy, which is the arm of that name."""
    return run.get("arm", run["strategy"])


def report(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    runs = [r for r in runs if not r.get("train_only")]  # importance logs only, for the reproducibility study
    if not runs:
        raise FileNotFoundError(f"no saved runs in {out / 'runs'}; run the benchmark without --report_only first")
    by = {(_arm(r), r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    arms = [a for a in ARMS if any((a, k) in by for k in seeds)]
    seeds = [k for k in seeds if all((a, k) in by for a in arms)]  # compare means over the same seeds
    left_out = sorted(f"{a}-seed{k}" for a, k in by if k not in seeds)
    if not seeds:
        raise ValueError(f"no seed in {out / 'runs'} has a run of every arm ({', '.join(arms)}); run the missing ones")
    lines = [f"Means over {_seeds(seeds)} ± 95% CI"
             + (f"; runs without every arm left out: {', '.join(left_out)}" if left_out else "") + ".", "",
             "| arm | seeds | final held-out loss | option-scoring acc. (%) | generation acc. (%) | "
             "train s/run (incl. held-out curve; wall clock, shared machine) | importance updates/run |",
             "|---|---|---|---|---|---|---|"]
    for a in arms:
        rs = [by[(a, k)] for k in seeds]
        loss = mean_ci95([r["curve"][-1][1] for r in rs])
        acc = {m: mean_ci95([100 * statistics.fmean(sum(r["accuracy"][m].values(), [])) for r in rs])
               for m in ("score", "generate")}
        updates = [r.get("importance_updates") for r in rs]
        seconds = statistics.fmean(r["train_seconds"] for r in rs)
        lines.append(f"| {a} | {len(rs)} | {loss[0]:.4f} ± {loss[1]:.4f} | {acc['score'][0]:.1f} ± "
                     f"{acc['score'][1]:.1f} | {acc['generate'][0]:.1f} ± {acc['generate'][1]:.1f} | {seconds:.0f} | "
                     f"{'n/a' if None in updates else ', '.join(map(str, updates))} |")
    lines += ["", "Paired differences (same seed, same items), 95% CI: held-out loss over seeds; accuracies over "
              "the items, each item's difference averaged over the seeds first.", "",
              "| comparison | seeds | Δ final held-out loss | Δ held-out loss, mean of the last two thirds | "
              "Δ option-scoring acc. (pp) | Δ generation acc. (pp) |", "|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        pairs = [(by[(a, k)], by[(b, k)]) for k in seeds if (a, k) in by and (b, k) in by]
        if not pairs:
            continue
        dl = mean_ci95([x["curve"][-1][1] - y["curve"][-1][1] for x, y in pairs])
        dm = mean_ci95([_late_mean(x["curve"]) - _late_mean(y["curve"]) for x, y in pairs])
        da = {}
        for m in ("score", "generate"):
            da[m] = paired_item_ci95([[100 * (int(u) - int(v)) for t in x["accuracy"][m]
                                       for u, v in zip(x["accuracy"][m][t], y["accuracy"][m][t])] for x, y in pairs])
        lines.append(f"| {a} − {b} | {len(pairs)} | {dl[0]:+.4f} ± {dl[1]:.4f} | {dm[0]:+.4f} ± {dm[1]:.4f} | "
                     f"{da['score'][0]:+.1f} ± {da['score'][1]:.1f} | "
                     f"{da['generate'][0]:+.1f} ± {da['generate'][1]:.1f} |")
    lines += ["", *_seed_spread_table(by, seeds), "", *_arm_settings(by, seeds, arms), "",
              *_per_task_table(out, by, seeds, arms)]
    _plot(out, by, seeds, arms)
    return "\n".join(lines)


def _seed_spread_table(by, seeds, effect: float = 1.8) -> list[str]:
    """Per pair: each seed's accuracy difference, their spread, the items on which the arms disagree,
    and the seeds per arm a paired t-test over seeds needs to detect ``effect`` pp at 80% power."""
    if len(seeds) < 2:
        return []
    lines = [f"Seed spread of the accuracy differences (added after the three-seed results, for sizing a GPU run): "
             f"each seed's difference over all items, its standard deviation s over seeds, the share of items the two "
             f"arms answer differently, and the seeds per arm to detect +{effect} pp at 80% power if s held.", "",
             "| comparison | measure | per seed (pp) | s (pp) | items answered differently | seeds per arm |",
             "|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        if not all((a, k) in by and (b, k) in by for k in seeds):
            continue
        for m in ("score", "generate"):
            pairs = [(sum(by[(a, k)]["accuracy"][m].values(), []), sum(by[(b, k)]["accuracy"][m].values(), []))
                     for k in seeds]
            diffs = [100 * (statistics.fmean(map(int, x)) - statistics.fmean(map(int, y))) for x, y in pairs]
            differ = statistics.fmean(statistics.fmean(u != v for u, v in zip(x, y)) for x, y in pairs)
            sd = statistics.stdev(diffs)
            lines.append(f"| {a} − {b} | {m} | {', '.join(f'{d:+.2f}' for d in diffs)} | {sd:.2f} | "
                         f"{100 * differ:.0f}% | {seeds_for_power(sd, effect)} |")
    return lines


def _arm_settings(by, seeds, arms) -> list[str]:
    """One line per arm: what it is, with the settings its runs were saved with (IST's T_c, μ and reward scale;
    a peer rule's K and parameters)."""
    lines = ["Arms:", ""]
    for a in arms:
        config = by[(a, seeds[0])].get("ist_config")
        detail = ""
        if config and config["strategy"] == "ist":
            detail = f" (T_c = {config['probe_interval']}, μ = {config['mu']:g}, rewards: {config['reward_scale']})"
        elif config and a in RULE_ARMS:
            settings = [f"{'K' if name == 'switch_interval' else name} = {config[name]}"
                        for name in rule_catalog.traits(config["strategy"]).parameter_names() if name in config]
            detail = f" ({', '.join(settings)})"
        lines.append(f"- `{a}`: {ARMS[a]}{detail}")
    return lines


def _per_task_table(out: Path, by, seeds, arms) -> list[str]:
    """Accuracy per task (means over ``seeds``), beside the untuned model's option scoring when saved."""
    base_file = out / "base.json"
    base = json.loads(base_file.read_text())["accuracy"]["score"] if base_file.exists() else None
    columns = ([("base", "score")] if base else []) + [(a, m) for m in ("score", "generate") for a in arms]
    names = {"score": "option scoring", "generate": "generation"}
    lines = ["Accuracy per task (%), means over the same seeds" + ("; base = the untuned model, option scoring only "
             "(it never produces the answer format)" if base else "; no base.json saved") + ":", "",
             "| task | " + " | ".join(f"{a} ({names[m]})" for a, m in columns) + " |", "|---|" + "---|" * len(columns)]
    first = by[(arms[0], seeds[0])]["accuracy"]["score"]
    if base and {t: len(c) for t, c in base.items()} != {t: len(c) for t, c in first.items()}:
        raise ValueError(f"{base_file} scored other items than the runs (another --tasks or --eval_limit); delete it "
                         "and run the benchmark again to rescore the base model")
    for task in [*first, "average"]:
        cells = []
        for a, m in columns:
            runs = [base] if a == "base" else [by[(a, k)]["accuracy"][m] for k in seeds]
            correct = [c for acc in runs for t in (first if task == "average" else [task]) for c in acc[t]]
            cells.append(f"{100 * statistics.fmean(correct):.1f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _seeds(seeds: list[int]) -> str:
    return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def _late_mean(curve) -> float:
    """Mean held-out loss over the points in the last two thirds of training, past format learning."""
    return statistics.fmean(loss for step, loss in curve if step >= curve[-1][0] / 3)


def _plot(out: Path, by, seeds, arms) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_height = 0.25 * math.ceil(len(arms) / 2)  # inches, below the axes in two columns: long labels hid curves
    figure, (whole, late) = plt.subplots(1, 2, figsize=(11, 4 + legend_height))
    for a in arms:
        curves = [by[(a, k)]["curve"] for k in seeds]
        steps = [p[0] for p in curves[0]]
        values = [[c[i][1] for c in curves] for i in range(len(steps))]
        late_from = next(i for i, step in enumerate(steps) if step >= steps[-1] / 3)  # as in _late_mean
        for axis, first in ((whole, 0), (late, late_from)):
            axis.plot(steps[first:], [statistics.fmean(v) for v in values[first:]], marker=".", label=ARMS[a])
            axis.fill_between(steps[first:], [min(v) for v in values[first:]], [max(v) for v in values[first:]],
                              alpha=0.2)
    whole.set_yscale("log")  # format learning drops the loss 20-fold first; the arms differ after it
    whole.set(xlabel="optimizer step", ylabel="held-out answer loss (log scale)", title="whole run")
    late.set(xlabel="optimizer step", ylabel="held-out answer loss", title="after format learning (last two thirds)")
    figure.legend(*late.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize="small", frameon=False)
    figure.suptitle(f"SmolLM2-135M, commonsense mix: mean and min-max over {_seeds(seeds)}")
    figure.tight_layout(rect=(0, legend_height / (4 + legend_height) + 0.02, 1, 1))
    tmp = out / ".loss_curves.tmp.png"
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, out / "loss_curves.png")


# ---- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/accuracy-updates",
                        help="Folder of runs/ (resumable), base.json, results.md and loss_curves.png.")
    parser.add_argument("--arms", default=None, help=f"Comma-separated arms, run in this order per seed: "
                        f"{', '.join(ARMS)}. Default: {DEFAULT_ARMS}.")
    parser.add_argument("--strategies", default=None, help="Old name of --arms (all, random, ist).")
    parser.add_argument("--seeds", default="1,2,3",
                        help="Comma-separated seeds; every arm of a seed runs before the next seed.")
    parser.add_argument("--max_steps", type=int, default=300,
                        help="Optimizer steps per run. 300 steps make 150 importance updates at T_c = 2, 30 at "
                        "T_c = 10.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--mu", type=float, default=10.0,
                        help="μ of the ist and ist-tc2 arms (the paper's for commonsense).")
    parser.add_argument("--spread_mu", type=float, default=0.1,
                        help="μ of the ist-spread arm, in units of the rewards' spread over the N_c candidates. 0.1: "
                        "the main job's probes (runs/istune, commonsense) had paper-scale rewards of root mean square "
                        "about 0.01 after format learning, so μ = 10 moved I by about 0.1 per update; 0.1 keeps that "
                        "step (see benchmarks/results/accuracy-updates/PROTOCOL.md).")
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=256, help="Held-out training-mix examples for the loss curve.")
    parser.add_argument("--curve_every", type=int, default=25, help="Held-out loss every this many steps.")
    parser.add_argument("--tasks",
                        default="boolq,piqa,social_i_qa,hellaswag,winogrande,ARC-Easy,ARC-Challenge,openbookqa",
                        help="Comma-separated commonsense tasks (default: all eight, in the earlier studies' order).")
    parser.add_argument("--eval_limit", type=int, default=100,
                        help="Items per task (a seeded sample, the same for every run).")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--train_only", action="store_true",
                        help="Train and keep each run's IST log only: no held-out curve, no evaluation, no report. "
                        "For `istune analyze reproducibility --logs` (importance learned during training), e.g. with "
                        "--arms ist-tc2-mu100.")
    return parser


def check_options(opts) -> tuple[list[str], list[int]]:
    """The arms and seeds to run; ValueError naming the option, the value and the fix for anything else."""
    if opts.arms is not None and opts.strategies is not None:
        raise ValueError(f"--arms={opts.arms!r} and --strategies={opts.strategies!r}: --strategies is the old name of "
                         "--arms; give only --arms.")
    old_name = opts.strategies is not None
    flag, text = ("strategies", opts.strategies) if old_name else ("arms", opts.arms or DEFAULT_ARMS)
    arms = parse_list(flag, text, allowed=ARMS)
    seeds = parse_list("seeds", opts.seeds, int)
    parse_list("tasks", opts.tasks, allowed=COMMONSENSE_TASKS)
    require_at_least_one(opts, ("max_steps", "batch_size", "rank", "cutoff_len", "heldout", "curve_every",
                                "eval_limit"))
    for name, fix in (("lr", "e.g. 3e-4"), ("mu", "the paper: 10 for commonsense"), ("spread_mu", "e.g. 0.1")):
        value = getattr(opts, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name}={value!r} must be a finite number above 0 ({fix}).")
    return arms, seeds


def check_saved(out: Path, arms: list[str], seeds: list[int], opts) -> None:
    """Refuse to resume from saved runs (or a base.json) made with other options than this call's."""
    wanted = [(out / "runs" / f"{a}-seed{k}.json", a, k) for k in seeds for a in arms]
    for path, arm, seed in [(out / "base.json", None, None), *wanted]:
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        names = ("tasks", "eval_limit") if arm is None else RUN_OPTIONS
        for name in names:
            if name in saved.get("options", {}) and saved["options"][name] != getattr(opts, name):
                raise ValueError(f"{path} was made with --{name}={saved['options'][name]!r}, this call has "
                                 f"--{name}={getattr(opts, name)!r}; use the same value, another --out, or delete "
                                 "the file.")
        if arm is not None and saved.get("train_only", False) != opts.train_only:
            made, now = ("with", "without") if saved.get("train_only") else ("without", "with")
            raise ValueError(f"{path} was made {made} --train_only, this call is {now} it; use the same, another "
                             "--out, or delete the file.")
        config = saved.get("ist_config")
        if arm is not None and config is not None and not same_config(config, arm_config(arm, seed, opts)):
            raise ValueError(f"{path} was made with another ISTConfig ({config}) than arm {arm!r} has now (check "
                             "--mu, --spread_mu); use the same options, another --out, or delete the file.")


def _recorded_options(opts: argparse.Namespace) -> dict:
    """The options as a run's record keeps them: ``--out`` relative to the repository holding it."""
    return {**vars(opts), "out": repo_relative(opts.out)}


def same_config(saved: dict, config: ISTConfig) -> bool:
    """Whether a run saved with ISTConfig ``saved`` (a dict) was made with ``config``. A field ISTConfig gained after
    the run was saved (``stored_layers``, the rules' parameters) is absent from it: it matches if ``config`` holds
    that field's default, the value every earlier run had."""
    expected, defaults = config.to_dict(), ISTConfig().to_dict()
    same = all(saved[name] == value if name in saved else value == defaults[name] for name, value in expected.items())
    return same and set(saved) <= set(expected)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    if opts.train_only and opts.report_only:
        parser.error("--train_only and --report_only: a train-only run writes no report; give one of them.")
    try:
        arms, seeds = check_options(opts)
        if not opts.report_only:
            check_saved(out, arms, seeds, opts)
    except ValueError as error:
        parser.error(str(error))
    commit = git_commit(Path(__file__).resolve().parent.parent)  # before this run writes into the tree
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not opts.report_only:
        if not opts.train_only and not (out / "base.json").exists():
            print("== base model (no tuning), option scoring", flush=True)
            write_text(out / "base.json", json.dumps(run_base(opts)))
        for seed in seeds:
            for arm in arms:
                path = out / "runs" / f"{arm}-seed{seed}.json"
                if path.exists():
                    continue
                print(f"== {arm} seed {seed}", flush=True)
                result = run_one(arm, seed, opts, out / "runs" / f"{arm}-seed{seed}")
                write_text(path, json.dumps(result))
    if opts.train_only:
        return
    table = report(out)
    compared = "the layer-selection rules" if set(arms) & set(RULE_ARMS) else "random sparse vs IST arms"
    header = (f"# LoRA on every layer vs {compared}, SmolLM2-135M, commonsense mix\n\n"
              f"Command: `.venv/bin/python benchmarks/accuracy_compare.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`  \n"
              f"Commit: {commit}; "
              f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    write_text(out / "results.md", header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
