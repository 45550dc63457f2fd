"""Is the importance IST learns reproducible? Rankings across seeds as importance updates accumulate.

    istune analyze reproducibility --run runs/istune --configs "mu=10;mu=100" --seeds 1,2,3 --updates 150
    istune analyze reproducibility --logs "mu=10:runs/s1,runs/s2,runs/s3"      # importance learned while training

Two sources of importance trajectories (the importance vector I after each update):

* **frozen** (``--run``): the adapters of a finished ``istune train`` run are loaded and kept
  frozen; each seed runs ``--updates`` importance updates from zero (N_c no-grad probe
  forwards each, eq. 8-10; as ``istune bench probes`` does). Seeds differ in candidate draws
  and probe batches only. Each (config, seed) run is saved as it finishes, so the command
  resumes where it stopped.
* **training** (``--logs``): the ``ist_log.jsonl`` of runs trained with different seeds; the
  adapters moved while importance was learned.

At checkpoints along the trajectories the seeds' rankings are compared pairwise: Spearman
rank correlation and the overlap of their top-N_u sets, each averaged over the pairs, and
each beside a permutation baseline (every seed's vector shuffled independently, many times:
the mean and the 95th percentile of the same statistic). A ranking is called reproducible
from the first checkpoint after which the mean Spearman stays above the baseline's 95th
percentile. Writes ``reproducibility.json``, ``.md`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from istune.bench.probes import spearman, top_k_overlap

PERMUTATIONS = 1000


@dataclass(frozen=True)
class Group:
    """Trajectories learned under one setting (e.g. μ = 10), one per seed."""

    label: str
    trajectories: list  # [seed][update] -> importance vector (N_L floats)


# ---- statistics ------------------------------------------------------------------------------


def pairwise_agreement(vectors: Sequence[Sequence[float]], k: int) -> tuple[float | None, float]:
    """Mean Spearman (None when every pair has a constant vector) and mean top-k overlap over all pairs."""
    rhos, overlaps = [], []
    for a, b in itertools.combinations(vectors, 2):
        rho = spearman(a, b)
        if rho == rho:  # NaN: a constant vector ranks nothing
            rhos.append(rho)
        overlaps.append(top_k_overlap(a, b, k))
    return (statistics.fmean(rhos) if rhos else None), statistics.fmean(overlaps)


def permutation_baseline(vectors: Sequence[Sequence[float]], k: int, permutations: int = PERMUTATIONS,
                         seed: int = 0) -> dict:
    """The agreement statistics when every vector's positions are shuffled independently.

    Returns mean and 95th percentile of the pairwise mean Spearman and top-k overlap.
    """
    rng = random.Random(seed)
    rhos, overlaps = [], []
    for _ in range(permutations):
        shuffled = [rng.sample(list(vector), len(vector)) for vector in vectors]
        rho, overlap = pairwise_agreement(shuffled, k)
        if rho is not None:
            rhos.append(rho)
        overlaps.append(overlap)
    return {"spearman_mean": statistics.fmean(rhos) if rhos else None, "spearman_95": _percentile(rhos, 0.95),
            "overlap_mean": statistics.fmean(overlaps), "overlap_95": _percentile(overlaps, 0.95)}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def checkpoints(updates: int, every: int) -> list[int]:
    """Update counts to compare at: 1, then every ``every`` updates, and the last one."""
    points = sorted({1, updates, *range(every, updates + 1, every)})
    return [p for p in points if p <= updates]


def agreement_curve(group: Group, k: int, every: int = 10, permutations: int = PERMUTATIONS) -> list[dict]:
    """One row per checkpoint: agreement across seeds after that many updates, and its permutation baseline."""
    if len(group.trajectories) < 2:
        raise ValueError(f"{group.label}: reproducibility needs at least two seeds' trajectories, got "
                         f"{len(group.trajectories)}.")
    updates = min(len(trajectory) for trajectory in group.trajectories)
    if updates == 0:
        raise ValueError(f"{group.label}: a trajectory has no importance update.")
    rows = []
    for count in checkpoints(updates, every):
        vectors = [trajectory[count - 1] for trajectory in group.trajectories]
        rho, overlap = pairwise_agreement(vectors, k)
        baseline = permutation_baseline(vectors, k, permutations, seed=count)
        rows.append({"updates": count, "spearman": rho, "overlap": overlap, **{f"baseline_{key}": value for key, value
                                                                               in baseline.items()}})
    return rows


def reproducible_from(rows: list[dict]) -> int | None:
    """The first checkpoint after which the mean Spearman stays above the baseline's 95th percentile; None if never."""
    first = None
    for row in rows:
        above = row["spearman"] is not None and row["baseline_spearman_95"] is not None and \
            row["spearman"] > row["baseline_spearman_95"]
        if above and first is None:
            first = row["updates"]
        elif not above:
            first = None
    return first


# ---- trajectories ----------------------------------------------------------------------------


def log_trajectory(path: Path) -> list[list[float]]:
    """The importance after each importance update, read from an ``ist_log.jsonl`` (skipped updates included)."""
    if path.is_dir():
        path = path / "ist_log.jsonl"
    if not path.is_file():
        raise ValueError(f"--logs: {str(path)!r} does not exist; give `istune train` output folders of IST runs.")
    trajectory = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                raise ValueError(f"--logs: {str(path)!r} line {number} is not JSON; the log is damaged.") from None
            if event.get("event") == "probe":
                trajectory.append(event["importance"])
    if not trajectory:
        raise ValueError(f"--logs: {str(path)!r} holds no importance update (strategy 'ist' with at least T_c steps "
                         "is needed).")
    return trajectory


def parse_log_groups(text: str) -> list[tuple[str, list[Path]]]:
    """``"mu=10:runs/a,runs/b;mu=100:runs/c,runs/d"`` -> [(label, folders), ...]."""
    groups = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        label, sep, folders = part.rpartition(":")
        paths = [Path(f.strip()) for f in folders.split(",") if f.strip()]
        if not sep or not label.strip() or len(paths) < 2:
            raise ValueError(f"--logs {text!r}: {part!r} is not LABEL:RUN,RUN[,RUN]; write e.g. "
                             "--logs \"mu=10:runs/seed1,runs/seed2,runs/seed3\" (at least two runs per label).")
        groups.append((label.strip(), paths))
    if not groups:
        raise ValueError(f"--logs {text!r}: no group given.")
    return groups


def frozen_trajectories(run_dir: str, configs: list[tuple[str, dict]], seeds: list[int], updates: int, out: Path,
                        progress: Callable[[str], None] = print) -> list[Group]:
    """Importance learned with the adapters of ``run_dir`` frozen, per config and seed; resumable.

    Each finished run is saved as ``out/runs/<label>_seed<seed>.json``; a saved run with the
    same settings is loaded instead of being run again.
    """
    import dataclasses

    from istune.bench.probes import REFERENCE, adapter_checksum, importance_run, load_run
    from istune.io import write_text

    loaded = None
    groups = []
    for label, overrides in configs:
        trajectories = []
        for seed in seeds:
            path = out / "runs" / f"{_file_label(label)}_seed{seed}.json"
            settings = {"run": str(run_dir), "label": label, "overrides": overrides, "seed": seed, "updates": updates}
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("settings") == settings:
                    trajectories.append(saved["trajectory"])
                    progress(f"{label} seed {seed}: loaded {path}")
                    continue
                raise ValueError(f"{path} was made with other settings ({saved.get('settings')}); use another --out "
                                 "or delete it.")
            if loaded is None:
                loaded = load_run(Path(run_dir), packed=True)  # full probes only: packed batches, same losses
                checksum = adapter_checksum(loaded[0])
            model, config, source, _ = loaded
            result = importance_run(model, dataclasses.replace(config, **overrides), REFERENCE, seed, source, updates)
            if adapter_checksum(model) != checksum:
                raise RuntimeError("The adapter weights changed during the importance runs; the study is void.")
            write_text(path, json.dumps({"settings": settings, "trajectory": result["trajectory"],
                                           "seconds_per_update": result["seconds_per_update"]}))
            trajectories.append(result["trajectory"])
            progress(f"{label} seed {seed}: {updates} updates, {result['seconds_per_update']:.2f} s/update")
        groups.append(Group(label, trajectories))
    return groups


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label)


# ---- report ----------------------------------------------------------------------------------


def study(groups: list[Group], k: int, every: int, permutations: int = PERMUTATIONS) -> dict:
    """Agreement curves and verdicts of every group."""
    result = {"update_layers": k, "groups": []}
    for group in groups:
        rows = agreement_curve(group, k, every, permutations)
        result["groups"].append({"label": group.label, "seeds": len(group.trajectories),
                                 "num_layers": len(group.trajectories[0][0]), "rows": rows,
                                 "reproducible_from": reproducible_from(rows)})
    return result


def format_study(result: dict) -> str:
    k = result["update_layers"]
    lines = []
    for group in result["groups"]:
        verdict = group["reproducible_from"]
        lines.append(f"\n### {group['label']} ({group['seeds']} seeds, N_L = {group['num_layers']})\n")
        lines.append("Reproducible (mean Spearman above the permutation 95th percentile from then on): "
                     + (f"from {verdict} updates." if verdict is not None else "not within these updates."))
        lines.append(f"\n| updates | Spearman | permuted: mean / 95th pct | top-{k} overlap "
                     "| permuted: mean / 95th pct |")
        lines.append("|---:|---:|---:|---:|---:|")
        for row in group["rows"]:
            rho = "n/a" if row["spearman"] is None else f"{row['spearman']:.3f}"
            lines.append(f"| {row['updates']} | {rho} | {_fmt(row['baseline_spearman_mean'])} / "
                         f"{_fmt(row['baseline_spearman_95'])} | {row['overlap']:.2f} | "
                         f"{row['baseline_overlap_mean']:.2f} / {row['baseline_overlap_95']:.2f} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_study(result: dict, path: Path) -> Path:
    """Spearman and top-N_u overlap against the number of updates, each group beside its permutation band."""
    from istune.analysis.plots import _pyplot
    from istune.io import save_figure

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, group in enumerate(result["groups"]):
        color = f"C{index}"
        x = [row["updates"] for row in group["rows"]]
        left.plot(x, [row["spearman"] if row["spearman"] is not None else float("nan") for row in group["rows"]],
                  marker="o", color=color, label=group["label"])
        left.plot(x, [row["baseline_spearman_95"] for row in group["rows"]], linestyle=":", color=color)
        right.plot(x, [row["overlap"] for row in group["rows"]], marker="o", color=color, label=group["label"])
        right.plot(x, [row["baseline_overlap_95"] for row in group["rows"]], linestyle=":", color=color)
    left.set(xlabel="importance updates", ylabel="mean pairwise Spearman across seeds",
             title="Ranking agreement (dotted: permutation 95th pct)")
    right.set(xlabel="importance updates", ylabel=f"mean top-{result['update_layers']} overlap",
              title="Top-N_u overlap (dotted: permutation 95th pct)")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(figure, path)
    plt.close(figure)
    return path


def write_study(result: dict, out: Path, meta: dict) -> None:
    from istune.io import write_text

    write_text(out / "reproducibility.json", json.dumps({**meta, **result}, indent=2))
    write_text(out / "reproducibility.md", (
        f"# Reproducibility of the learned importance\n\nCommand: `{meta['command']}`  \nCommit {meta['commit']}, "
        f"{meta['date']}, {meta['machine']}.\n\nPairwise agreement of the seeds' importance rankings after each "
        f"number of updates, beside a permutation baseline ({PERMUTATIONS} shuffles of every seed's vector).\n"
        f"{format_study(result)}\n\n![reproducibility](reproducibility.png)\n"))
    plot_study(result, out / "reproducibility.png")
