"""Issue 36's pilot: which synthetic tasks give a testbed where fine-tuning moves the metric and layers matter.

    PYTHONPATH=src .venv/bin/python benchmarks/layer_tasks_pilot.py --out benchmarks/results/layer-tasks-pilot
    PYTHONPATH=src .venv/bin/python benchmarks/layer_tasks_pilot.py --out ... --report_only

The protocol is ``benchmarks/results/layer-tasks-pilot/PROTOCOL.md`` (written before the first run). Per
candidate task (``--tasks``, each a ``--data`` spec):

1. screen: LoRA on every layer (arm ``all``) at seed 1, as ``istune compare`` would make that run;
2. quarters, only for a task whose screen passes criterion (a) at seed 1: ``istune compare --arms
   all,quarter:1,quarter:2,quarter:3,quarter:4 --seeds 1,2`` (the screen run is reused as all-seed1).

Every run is its own ``python -m istune`` process, saved as it ends; the pilot resumes run by run.
``pilot.md`` (the pilot table) is rebuilt from the saved runs after every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from istune.runs import quarter_layers

# The candidates, in the order the protocol lists them (each a --data spec); HARDER from the amendment of 00:50,
# screened after the first quarter runs of the others.
TASKS = ("task:cipher:length=8:alphabet=26", "task:reverse", "task:sort", "task:add:digits=3", "task:count")
HARDER = ("task:reverse:length=12", "task:sort:length=12", "task:add:digits=5", "task:count:length=24")
QUARTERS = ("quarter:1", "quarter:2", "quarter:3", "quarter:4")
SEEDS = (1, 2)
# The options every pilot run shares (PROTOCOL.md, "Settings").
OPTIONS = ("--model", "smollm2-135m",
           "--target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "--rank", "16", "--alpha", "32", "--per_device_train_batch_size", "16", "--learning_rate", "2e-3",
           "--max_steps", "240", "--train_samples", "3840", "--heldout_samples", "64", "--eval_limit", "300",
           "--curve_every", "60", "--compare_base", "false", "--logging_steps", "20", "--disable_tqdm", "true")
START_BELOW, REACH, QUARTER_GAP = 0.20, 0.70, 0.15  # criteria (a) and (b)
NUM_LAYERS = 30  # SmolLM2-135M


def task_folder(out: Path, task: str) -> Path:
    return out / task.removeprefix("task:").replace(":", "_").replace("=", "-")


def istune(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "src")}
    subprocess.run([sys.executable, "-m", "istune", *args], check=True, env=env)


def screen(out: Path, task: str) -> None:
    """Arm ``all`` at seed 1, in the folder and with the options ``istune compare`` gives that run."""
    single_run(out, task, "all", 1, "--strategy", "all")


def first_quarters(out: Path, task: str) -> None:
    """The four quarter arms at seed 1 (breadth first: every task's seed 1 before any seed 2)."""
    for quarter in QUARTERS:
        layers = quarter_layers(int(quarter[-1]), NUM_LAYERS)
        single_run(out, task, quarter, 1, "--strategy", "fixed", "--layers", *map(str, layers))


def single_run(out: Path, task: str, arm: str, seed: int, *rule: str) -> None:
    """One run of ``arm``, in the folder and with the options ``istune compare`` gives it (compare reuses it)."""
    folder = task_folder(out, task) / "runs" / f"{arm.replace(':', '_')}-seed{seed}"
    if (folder / "results.json").is_file():
        return
    istune("train", "--data", task, *OPTIONS, *rule, "--seed", str(seed), "--data_seed", str(seed),
           "--output_dir", str(folder), "--overwrite", "true")


def quarters(out: Path, task: str) -> None:
    istune("compare", "--arms", ",".join(("all", *QUARTERS)), "--seeds", ",".join(map(str, SEEDS)),
           "--out", str(task_folder(out, task)), "--data", task, *OPTIONS)


def curve(out: Path, task: str, arm: str, seed: int) -> dict | None:
    path = task_folder(out, task) / "runs" / f"{arm.replace(':', '_')}-seed{seed}" / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    points = results["curve"]["points"]
    middle = next(p for p in points if p["step"] >= results["curve"]["final_step"] // 2)
    seconds = (results["train_seconds"] - results["curve"]["seconds"]) / results["curve"]["final_step"]
    return {"start": points[0]["generate"], "middle": middle["generate"], "middle_step": middle["step"],
            "final": points[-1]["generate"], "seconds_per_step": seconds}


def passes_screen(run: dict | None) -> bool:
    return run is not None and run["start"] < START_BELOW and run["final"] >= REACH


def quarters_apart(out: Path, task: str, seed: int) -> bool | None:
    """Criterion (b) at one seed: best and worst quarter 15 pp apart at the midpoint or the end (None: not run)."""
    qs = [curve(out, task, q, seed) for q in QUARTERS]
    if not all(qs):
        return None
    return any(max(q[k] for q in qs) - min(q[k] for q in qs) >= QUARTER_GAP for k in ("middle", "final"))


def table(out: Path, tasks: tuple[str, ...]) -> str:
    """The pilot table: every task tried, its numbers per seed, and the verdict by the protocol's criteria."""
    lines = ["| task | seed | all: step 0 → mid → final % | quarters 1/2/3/4 at mid % | quarters 1/2/3/4 final % "
             "| best − worst quarter, mid / final pp | all s/step | (a) | (b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for task in tasks:
        a_ok, b_ok = [], []
        for seed in SEEDS:
            run = curve(out, task, "all", seed)
            if run is None:
                continue
            qs = [curve(out, task, q, seed) for q in QUARTERS]
            a = run["start"] < START_BELOW and run["final"] >= REACH
            a_ok.append(a)
            cells = [task, str(seed), f"{100 * run['start']:.0f} → {100 * run['middle']:.0f} → "
                     f"{100 * run['final']:.0f}"]
            if all(qs):
                gaps = [max(q[k] for q in qs) - min(q[k] for q in qs) for k in ("middle", "final")]
                b = max(gaps) >= QUARTER_GAP
                b_ok.append(b)
                cells += ["/".join(f"{100 * q['middle']:.0f}" for q in qs), "/".join(f"{100 * q['final']:.0f}"
                          for q in qs), f"{100 * gaps[0]:.0f} / {100 * gaps[1]:.0f}"]
            else:  # the quarters run so far, "–" for the others
                cells += ["/".join("–" if q is None else f"{100 * q[k]:.0f}" for q in qs) if any(qs) else "–"
                          for k in ("middle", "final")] + ["–"]
                b = None
            cells += [f"{run['seconds_per_step']:.2f}", "yes" if a else "no", "–" if b is None else
                      ("yes" if b else "no")]
            lines.append("| " + " | ".join(cells) + " |")
        kept = len(a_ok) == len(SEEDS) and all(a_ok) and len(b_ok) == len(SEEDS) and all(b_ok)
        best = _best_quarter(out, task) if kept else None
        verdicts.append(f"- `{task}`: " + ("kept" + (f", best quarter {best}" if best else "") if kept else
                                           "not kept" if (a_ok and not all(a_ok)) or (b_ok and not all(b_ok))
                                           else "incomplete"))
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"


def _best_quarter(out: Path, task: str) -> str:
    """The quarter with the highest final accuracy summed over the seeds."""
    totals = {q: sum(curve(out, task, q, s)["final"] for s in SEEDS) for q in QUARTERS}
    return max(totals, key=totals.get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/layer-tasks-pilot")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated --data specs, in order.")
    parser.add_argument("--stage", choices=("screen", "seed1", "quarters", "both", "all"), default="all",
                        help="all: screen, seed-1 quarters of the tasks that pass (a), the same for HARDER, then "
                        "seed 2 (istune compare) task by task; seed1: the seed-1 quarters of --tasks that pass "
                        "(a); quarters: seed 2 of --tasks that pass (a) and, where the seed-1 quarters ran, (b)")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    out, tasks = Path(args.out), tuple(args.tasks.split(","))
    if args.report_only or args.stage == "all":
        tasks = tuple(dict.fromkeys((*tasks, *HARDER)))
    if args.stage == "all" and not args.report_only:
        for group in (TASKS, HARDER):
            for task in group:
                screen(out, task)
                (out / "pilot.md").write_text(table(out, tasks))
            for task in group:
                if passes_screen(curve(out, task, "all", 1)):
                    first_quarters(out, task)
                    (out / "pilot.md").write_text(table(out, tasks))
        args.stage = "quarters"
    if not args.report_only:
        if args.stage in ("screen", "both"):
            for task in tasks:
                screen(out, task)
                (out / "pilot.md").write_text(table(out, tasks))
        if args.stage == "seed1":
            for task in tasks:
                if passes_screen(curve(out, task, "all", 1)):
                    first_quarters(out, task)
                    (out / "pilot.md").write_text(table(out, tasks))
        if args.stage in ("quarters", "both"):
            for task in tasks:
                # A task that fails (b) at seed 1 cannot be kept (both seeds must pass): no seed 2 for it.
                if passes_screen(curve(out, task, "all", 1)) and quarters_apart(out, task, 1) is not False:
                    quarters(out, task)
                    (out / "pilot.md").write_text(table(out, tasks))
    text = table(out, tasks)
    (out / "pilot.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
