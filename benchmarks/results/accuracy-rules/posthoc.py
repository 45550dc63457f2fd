"""The figures FINDINGS.md lists as "added after the results were seen" (issue 24), from the saved runs.

    PYTHONPATH=src .venv/bin/python benchmarks/results/accuracy-rules/posthoc.py

Prints, for badam − random in generation, the per-task differences and the paired t over the items with its
two-sided p (normal approximation: 799 degrees of freedom), and, per rule and seed, which layers it trained:
the share of steps of its most-trained layer, the layers it never trained, and its 8 most-trained layers.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
from pathlib import Path

from istune.bench.stats import paired_item_ci95, t_quantile_975

RUNS = Path(__file__).resolve().parent / "runs"
SEEDS = (1, 2, 3)
N_LAYERS = 30  # SmolLM2-135M


def accuracy(arm: str, seed: int, method: str) -> dict[str, list[bool]]:
    return json.loads((RUNS / f"{arm}-seed{seed}.json").read_text())["accuracy"][method]


def paired(arm: str, other: str, method: str) -> None:
    runs = {k: (accuracy(arm, k, method), accuracy(other, k, method)) for k in SEEDS}
    tasks = list(runs[SEEDS[0]][0])
    diffs = {t: [[100 * (int(u) - int(v)) for u, v in zip(a[t], b[t])] for a, b in runs.values()] for t in tasks}
    print(f"{arm} − {other}, {method}, per task (pp):",
          ", ".join(f"{t} {statistics.fmean(map(statistics.fmean, zip(*diffs[t]))):+.1f}" for t in tasks))
    mean, half = paired_item_ci95([sum((diffs[t][i] for t in tasks), []) for i in range(len(SEEDS))])
    n = sum(len(diffs[t][0]) for t in tasks)
    t_stat = mean / (half / t_quantile_975(n - 1))
    p_value = math.erfc(abs(t_stat) / math.sqrt(2))
    print(f"  all items: {mean:+.1f} ± {half:.1f} pp, t = {t_stat:.2f}, p ≈ {p_value:.1g}")


def layers(arm: str) -> None:
    for k in SEEDS:
        events = [json.loads(line) for line in (RUNS / f"{arm}-seed{k}" / "ist_log.jsonl").read_text().splitlines()]
        selections = [e["selected"] for e in events if e["event"] == "select"]
        counts = collections.Counter(layer for selected in selections for layer in selected)
        top = sorted(sorted(range(N_LAYERS), key=lambda i: -counts[i])[:8])
        busiest = max(range(N_LAYERS), key=lambda i: counts[i])
        print(f"{arm} seed {k}: layer {busiest} trained in {counts[busiest] / len(selections):.0%} of the steps; "
              f"never trained: {[i for i in range(N_LAYERS) if counts[i] == 0]}; top 8: {top}")


def outlier_ratios() -> None:
    for k in SEEDS:
        first = json.loads((RUNS / f"owlore-seed{k}" / "ist_log.jsonl").read_text().splitlines()[0])
        ratios = first["values"]
        largest, smallest = max(ratios) / sum(ratios), min(ratios) / sum(ratios)
        print(f"owlore seed {k}: {sum(r > 0 for r in ratios)} of {len(ratios)} ratios positive; share of the mass: "
              f"largest {largest:.1%} (layer {ratios.index(max(ratios))}), smallest {smallest:.1%}")


if __name__ == "__main__":
    paired("badam", "random", "generate")
    outlier_ratios()
    for arm in ("owlore", "gradnorm", "probe-once"):
        layers(arm)
