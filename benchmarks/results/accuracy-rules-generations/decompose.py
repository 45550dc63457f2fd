"""The read-out fixed in PROTOCOL.md: BAdam's generation deficit against random layers, split into format
failures (no answer word in the response) and wrong choices, per task; and the check that the runs reproduce
the committed ones of ../accuracy-rules item by item.

    PYTHONPATH=src .venv/bin/python benchmarks/results/accuracy-rules-generations/decompose.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EARLIER = HERE.parent / "accuracy-rules" / "runs"
ARMS, SEED = ("badam", "random"), 1
TEMPLATE = "the correct answer is"  # how every LLM-Adapters commonsense answer starts


def load(folder: Path, arm: str) -> dict:
    return json.loads((folder / f"{arm}-seed{SEED}.json").read_text())


def outcomes(run: dict) -> dict[str, list[str]]:
    """Per task, each generated item's outcome: 'correct', 'wrong choice' or 'format failure'."""
    correct, predictions = run["accuracy"]["generate"], run["generated"]["prediction"]
    return {task: ["correct" if ok else "format failure" if found is None else "wrong choice"
                   for ok, found in zip(correct[task], predictions[task])] for task in correct}


def main() -> None:
    runs = {arm: load(HERE / "runs", arm) for arm in ARMS}
    print("## Reproduction of ../accuracy-rules (per-item generation verdicts, seed 1)\n")
    for arm, run in runs.items():
        before = load(EARLIER, arm)["accuracy"]["generate"]
        now = run["accuracy"]["generate"]
        differing = sum(a != b for task in before for a, b in zip(before[task], now[task]))
        total = sum(len(v) for v in before.values())
        loss_before, loss_now = load(EARLIER, arm)["curve"][-1][1], run["curve"][-1][1]
        print(f"- {arm}: {differing} of {total} items differ; final held-out loss {loss_before:.6f} then, "
              f"{loss_now:.6f} now")

    kinds = ("correct", "wrong choice", "format failure")
    counted = {arm: {task: {k: seq.count(k) for k in kinds} for task, seq in outcomes(run).items()}
               for arm, run in runs.items()}
    tasks = list(counted["badam"])
    print("\n## Outcomes of the 100 generated items per task (badam / random)\n")
    print("| task | correct | wrong choice | format failure |\n|---|---|---|---|")
    for task in [*tasks, "all"]:
        cells = []
        for kind in kinds:
            pair = [sum(counted[a][t][kind] for t in tasks) if task == "all" else counted[a][task][kind]
                    for a in ARMS]
            cells.append(f"{pair[0]} / {pair[1]}")
        print(f"| {task} | " + " | ".join(cells) + " |")

    print("\n## What the responses look like (looked at after the decomposition, not in PROTOCOL.md)\n")
    for arm, run in runs.items():
        responses = [text for task in tasks for text in run["generated"]["response"][task]]
        template = sum(text.startswith(TEMPLATE) for text in responses)
        recited = sum(text.lstrip().startswith("1") for text in responses)
        found = [str(p) for task in tasks for p in run["generated"]["prediction"][task] if p is not None]
        first = sum(p.endswith("1") for p in found if p not in ("true", "false"))
        labelled = sum(p not in ("true", "false") for p in found)
        print(f"- {arm}: {template} of {len(responses)} responses start with the trained template "
              f"{TEMPLATE!r}; {recited} start with '1' (the first option recited); of the {labelled} option "
              f"labels found (boolq aside), {first} are the first option's")

    total = {arm: {k: sum(counted[arm][t][k] for t in tasks) for k in kinds} for arm in ARMS}
    deficit = total["random"]["correct"] - total["badam"]["correct"]
    extra_format = total["badam"]["format failure"] - total["random"]["format failure"]
    extra_wrong = total["badam"]["wrong choice"] - total["random"]["wrong choice"]
    print(f"\nDeficit: {deficit} items = {extra_format} more format failures + {extra_wrong} more wrong choices.")
    if deficit > 0:
        share = extra_format / deficit
        verdict = "format effect" if share >= 2 / 3 else "choice effect" if share <= 1 / 3 else "mixed"
        print(f"Format failures' share of the deficit: {share:.0%} -> {verdict} (PROTOCOL.md's thresholds).")


if __name__ == "__main__":
    main()
