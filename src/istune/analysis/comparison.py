"""The report of an ``istune compare`` folder, rebuilt from its saved runs alone.

    report = build_report("runs/compare", effect=0.05)      # the numbers, as results.json keeps them
    write_report("runs/compare", effect=0.05)               # results.md, report.json and curves.png

Per arm, over its seeds: the final accuracy and the area under the accuracy curve (the mean accuracy
over training, by the trapezoid rule), each with a 95% t-interval; the seconds a training step takes
(curve evaluation excluded); the steps and seconds to reach 50% and 80% of LoRA-on-every-layer's
final accuracy (arm ``all``); and how often the arm trained each layer (from its IST log), by
quarter of the layers. Paired differences (the same seed: same data, order and initialisation)
against ``all`` and ``random`` carry a 95% t-interval over seeds, the seeds' spread, and the
seeds a paired t-test would need to detect ``effect`` with 80% power.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from istune.bench.probes import spearman
from istune.bench.stats import mean_ci95, seeds_for_power
from istune.io import save_figure, write_json, write_text
from istune.runs import COMPARE_FILE, comparison_run_folder, quarter_layers

REFERENCES = ("all", "random")  # each arm's paired differences are taken against these, where present
THRESHOLDS = (0.5, 0.8)  # shares of the `all` arm's final accuracy for the time-to-accuracy columns
RESULTS_FILE = "results.json"
LOG_FILE = "ist_log.jsonl"


def read_run(folder: Path) -> dict[str, Any]:
    """One saved run's curve, timing and layer selections, as the report reads them."""
    results = json.loads((folder / RESULTS_FILE).read_text())
    curve = results.get("curve")
    if not curve or not curve.get("points"):
        raise ValueError(f"{folder} has no accuracy curve; make it with --curve_every K (istune compare does).")
    metric = "generate" if "generate" in curve["points"][0] else "score"
    steps = [p["step"] for p in curve["points"]]
    accuracy = [p[metric] for p in curve["points"]]
    final_step = curve["final_step"]
    training_seconds = results["train_seconds"] - curve["seconds"]
    selected, importance = _read_log(folder / LOG_FILE, len(results["importance"]))
    return {"metric": metric, "steps": steps, "accuracy": accuracy, "final": accuracy[-1],
            "auc": area_under_curve(steps, accuracy), "seconds_per_step": training_seconds / max(1, final_step),
            "selection_share": [count / max(1, final_step) for count in selected],
            "importance": importance, "fixed_layers": results["ist"].get("layers"),
            "heldout_loss": results["tuned"].get("heldout_loss")}


def area_under_curve(steps: list[int], accuracy: list[float]) -> float:
    """The mean accuracy over training: the trapezoid area under the curve divided by the steps it spans."""
    if len(steps) < 2 or steps[-1] == steps[0]:
        return accuracy[-1]
    area = sum((b - a) * (x + y) / 2 for a, b, x, y in zip(steps, steps[1:], accuracy, accuracy[1:]))
    return area / (steps[-1] - steps[0])


def steps_to_reach(steps: list[int], accuracy: list[float], target: float) -> int | None:
    """The first curve step whose accuracy is at least ``target``; None if the curve never gets there."""
    return next((step for step, value in zip(steps, accuracy) if value >= target), None)


def _read_log(log: Path, num_layers: int) -> tuple[list[int], list[tuple[int, list[float]]]]:
    """From an IST log: the steps in which each layer was selected (``select`` events), and the importance after
    each update, ``(step, I)`` (``probe`` events; empty for a rule without them)."""
    counts, importance = [0] * num_layers, []
    if log.is_file():
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "select":
                for layer in event["selected"]:
                    counts[layer] += 1
            elif event.get("event") == "probe" and not event.get("skipped"):
                importance.append((event["step"], event["importance"]))
    return counts, importance


def quarter_shares(shares: list[float]) -> list[float]:
    """The mean selection share of the layers of each quarter (``quarter_layers``, the quarter arms' layers)."""
    return [statistics.fmean(shares[i] for i in quarter_layers(q, len(shares))) for q in range(1, 5)]


def build_report(out: str | Path, effect: float = 0.05, quarters_from: str | Path | None = None) -> dict[str, Any]:
    """The comparison's numbers from the runs saved in ``out`` (only arms and seeds with a complete run).

    Args:
        quarters_from: another comparison's folder whose four ``quarter:K`` arms give the layers' value for the
            mechanism section (a pilot that measured them on other seeds); default: this comparison's own.
    """
    plan, runs = _saved_runs(Path(out), "--out")
    if not runs:
        raise ValueError(f"{out} holds no complete run yet.")
    reference = runs.get("all")
    target_base = statistics.fmean(r["final"] for r in reference.values()) if reference else None
    if target_base is not None and target_base <= 0:
        target_base = None  # LoRA on every layer learned nothing: no accuracy to reach a share of
    arms = {}
    for arm, by_seed in runs.items():
        values = list(by_seed.values())
        row = {"seeds": sorted(by_seed), "final": mean_ci95([r["final"] for r in values]),
               "auc": mean_ci95([r["auc"] for r in values]),
               "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in values),
               "selection_by_quarter": quarter_shares([statistics.fmean(col) for col in
                                                       zip(*(r["selection_share"] for r in values))]),
               "selection_share": [statistics.fmean(col) for col in zip(*(r["selection_share"] for r in values))]}
        if target_base is not None:
            for share in THRESHOLDS:
                reached = [steps_to_reach(r["steps"], r["accuracy"], share * target_base) for r in values]
                seconds = [s * r["seconds_per_step"] for s, r in zip(reached, values) if s is not None]
                row[f"to_{round(share * 100)}"] = {
                    "reached": sum(s is not None for s in reached), "of": len(reached),
                    "steps": statistics.fmean(s for s in reached if s is not None) if seconds else None,
                    "seconds": statistics.fmean(seconds) if seconds else None}
        arms[arm] = row
    pairs = []
    for other in REFERENCES:
        if other not in runs:
            continue
        for arm in runs:
            if arm == other:
                continue
            seeds = sorted(set(runs[arm]) & set(runs[other]))
            if len(seeds) < 2:
                continue
            pair = {"arm": arm, "against": other, "seeds": seeds}
            for measure in ("final", "auc"):
                diffs = [runs[arm][s][measure] - runs[other][s][measure] for s in seeds]
                sd = statistics.stdev(diffs)
                pair[measure] = {"mean_ci95": mean_ci95(diffs), "sd": sd,
                                 "seeds_for_effect": seeds_for_power(sd, effect) if sd > 0 else 2}
            pairs.append(pair)
    mechanism = layer_mechanism(runs, _saved_runs(Path(quarters_from), "--quarters_from")[1] if quarters_from
                                else None)
    if mechanism is not None and quarters_from:
        mechanism["quarters_from"] = str(quarters_from)
    metric = next(iter(next(iter(runs.values())).values()))["metric"]
    curves = {arm: {str(seed): {"steps": r["steps"], "accuracy": r["accuracy"]} for seed, r in by_seed.items()}
              for arm, by_seed in runs.items()}
    return {"metric": metric, "effect": effect, "all_final": target_base, "arms": arms, "pairs": pairs,
            "mechanism": mechanism, "quarters_from": str(quarters_from) if quarters_from else None,
            "curves": curves, "settings": plan["settings"]}


def _saved_runs(out: Path, option: str) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    """A comparison folder's plan (``compare.json``) and its complete runs, by arm and seed."""
    if not (out / COMPARE_FILE).is_file():
        raise ValueError(f"{option}={str(out)!r} holds no istune compare runs (no {COMPARE_FILE}); give the folder "
                         "a comparison wrote, or run one there.")
    plan = json.loads((out / COMPARE_FILE).read_text())
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in plan["arms"]:
        for seed in plan["seeds"]:
            folder = comparison_run_folder(out, arm, seed)
            if (folder / RESULTS_FILE).is_file():
                runs.setdefault(arm, {})[seed] = read_run(folder)
    return plan, runs


def layer_mechanism(runs: dict[str, dict[int, dict[str, Any]]],
                    quarter_runs: dict[str, dict[int, dict[str, Any]]] | None = None) -> dict[str, Any] | None:
    """How the rules' choices relate to the measured value of the layers, when the four quarter arms ran (in
    ``quarter_runs``, another comparison's runs, when given; else in ``runs``).

    The value of quarter k is the quarter:k arm's final accuracy (mean over its seeds). Per arm: Spearman's
    correlation of its selection share by quarter with those values. Per seed of an arm with importance
    updates (IST): the mean importance of each quarter's layers after the last update, its Spearman with the
    values, whether it ranks the best quarter first, the share of the N_u most important layers that lie in
    the best quarter, and the first update step from which the best quarter stays first to the end.
    """
    quarter_arms = [f"quarter:{k}" for k in range(1, 5)]
    quarter_runs = runs if quarter_runs is None else quarter_runs
    if not all(arm in quarter_runs for arm in quarter_arms):
        return None
    layers = [next(iter(quarter_runs[arm].values()))["fixed_layers"] for arm in quarter_arms]
    value = [statistics.fmean(r["final"] for r in quarter_runs[arm].values()) for arm in quarter_arms]
    best = max(range(4), key=value.__getitem__)
    result: dict[str, Any] = {"quarter_layers": layers, "quarter_value": value, "best_quarter": best + 1,
                              "arms": {}}
    for arm, by_seed in runs.items():
        if arm in quarter_arms:
            continue
        share = [statistics.fmean(col) for col in zip(*(r["selection_share"] for r in by_seed.values()))]
        by_quarter = [statistics.fmean(share[i] for i in group) for group in layers]
        entry: dict[str, Any] = {"selection_by_quarter": by_quarter, "spearman": spearman(by_quarter, value)}
        seeds = {}
        for seed, run in by_seed.items():
            if not run["importance"]:
                continue
            first = [max(range(4), key=lambda q, imp=imp: statistics.fmean(imp[i] for i in layers[q]))
                     for _, imp in run["importance"]]
            final = run["importance"][-1][1]
            per_quarter = [statistics.fmean(final[i] for i in group) for group in layers]
            top = sorted(range(len(final)), key=lambda i: -final[i])[: len(layers[best])]
            settled = next((run["importance"][k][0] for k in range(len(first))
                            if all(q == best for q in first[k:])), None)
            seeds[str(seed)] = {"importance_by_quarter": per_quarter, "spearman": spearman(per_quarter, value),
                                "ranks_best_first": first[-1] == best,
                                "top_overlap": len(set(top) & set(layers[best])) / len(layers[best]),
                                "settled_at_step": settled, "updates": len(run["importance"])}
        if seeds:
            entry["seeds"] = seeds
        result["arms"][arm] = entry
    return result


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    pct = _percent
    metric = {"generate": "exact-match / generation accuracy", "score": "option-scoring accuracy"}[report["metric"]]
    lines = [f"Accuracy: {metric} on the evaluation items; intervals are 95% t-intervals over seeds.", "",
             "| arm | seeds | final % | AUC % | s/step |" + _threshold_header(report) + " selected by quarter "
             "(bottom → top) |",
             "|---|---|---|---|---|" + "---|" * (2 * len(THRESHOLDS) if report["all_final"] is not None else 0)
             + "---|"]
    for arm, row in report["arms"].items():
        cells = [arm, str(len(row["seeds"])), pct(*row["final"]), pct(*row["auc"]), f"{row['seconds_per_step']:.2f}"]
        if report["all_final"] is not None:
            for share in THRESHOLDS:
                reach = row[f"to_{round(share * 100)}"]
                cells.append("–" if reach["steps"] is None else
                             f"{reach['steps']:.0f} ({reach['reached']}/{reach['of']})")
                cells.append("–" if reach["seconds"] is None else f"{reach['seconds']:.0f}")
        cells.append(" / ".join(f"{100 * v:.0f}" for v in row["selection_by_quarter"]))
        lines.append("| " + " | ".join(cells) + " |")
    if report["all_final"] is not None:
        lines += ["", f"Steps (mean over the seeds that got there, and how many did) and seconds of training to reach "
                  f"50% and 80% of `all`'s mean final accuracy ({100 * report['all_final']:.1f}%)."]
    if report["pairs"]:
        lines += ["", "Paired differences (same seed), percentage points; seeds: a paired t-test's seeds for 80% "
                  f"power to detect {100 * report['effect']:.1f} pp, from the spread of the differences.", "",
                  "| arm − against | seeds | final | sd | seeds | AUC | sd | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for pair in report["pairs"]:
            cells = [f"{pair['arm']} − {pair['against']}", str(len(pair["seeds"]))]
            for measure in ("final", "auc"):
                value = pair[measure]
                cells += [_signed(*value["mean_ci95"]), f"{100 * value['sd']:.1f}", str(value["seeds_for_effect"])]
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("mechanism"):
        lines += ["", *_format_mechanism(report["mechanism"])]
    return "\n".join(lines) + "\n"


def _format_mechanism(found: dict[str, Any]) -> list[str]:
    value = " / ".join(f"{100 * v:.1f}" for v in found["quarter_value"])
    source = f" (the runs in `{found['quarters_from']}`)" if found.get("quarters_from") else ""
    lines = [f"Layers that matter: the quarter arms' final accuracy{source}, bottom → top: {value} % (best: quarter "
             f"{found['best_quarter']}). Spearman ρ of each arm's selection share by quarter with those values:", "",
             "| arm | selected by quarter % | ρ |", "|---|---|---|"]
    for arm, entry in found["arms"].items():
        shares = " / ".join(f"{100 * v:.0f}" for v in entry["selection_by_quarter"])
        lines.append(f"| {arm} | {shares} | {_rho(entry['spearman'])} |")
    learned = [(arm, seed, row) for arm, entry in found["arms"].items()
               for seed, row in entry.get("seeds", {}).items()]
    if learned:
        lines += ["", "Learned importance (after the last update), per seed: mean importance by quarter, its ρ with "
                  "the quarters' values, whether the best quarter ranks first, the share of the N_u most important "
                  "layers inside the best quarter, and the update step from which the best quarter stays first.", "",
                  "| arm | seed | updates | importance by quarter | ρ | best first | top-N_u in best | settled at |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, seed, row in learned:
            by_quarter = " / ".join(f"{v:+.2f}" for v in row["importance_by_quarter"])
            settled = "never" if row["settled_at_step"] is None else f"step {row['settled_at_step']}"
            lines.append(f"| {arm} | {seed} | {row['updates']} | {by_quarter} | {_rho(row['spearman'])} | "
                         f"{'yes' if row['ranks_best_first'] else 'no'} | {100 * row['top_overlap']:.0f}% | "
                         f"{settled} |")
    return lines


def _rho(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}"


def _threshold_header(report: dict[str, Any]) -> str:
    if report["all_final"] is None:
        return ""
    return "".join(f" steps to {round(100 * s)}% | s to {round(100 * s)}% |" for s in THRESHOLDS)


def _percent(mean: float, half: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def _signed(mean: float, half: float) -> str:
    return f"{100 * mean:+.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    """Each arm's mean accuracy curve over its seeds, with the seeds' min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for arm, by_seed in report["curves"].items():
        runs = list(by_seed.values())
        steps = runs[0]["steps"]
        if any(r["steps"] != steps for r in runs):  # curves of other steps: plot each seed alone
            for r in runs:
                axis.plot(r["steps"], [100 * a for a in r["accuracy"]], alpha=0.4)
            continue
        columns = list(zip(*(r["accuracy"] for r in runs)))
        (line,) = axis.plot(steps, [100 * statistics.fmean(c) for c in columns], marker="o", markersize=2.5,
                            label=f"{arm} ({len(runs)} seeds)")
        axis.fill_between(steps, [100 * min(c) for c in columns], [100 * max(c) for c in columns],
                          color=line.get_color(), alpha=0.12)
    axis.set(xlabel="optimizer step", ylabel="accuracy (%)", title="Accuracy over training (mean, min-max over seeds)")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)
    return save_figure(figure, path)


def write_report(out: str | Path, effect: float = 0.05, quarters_from: str | Path | None = None) -> str:
    """Write ``results.md``, ``report.json`` and ``curves.png`` into ``out``; return the Markdown."""
    out = Path(out)
    report = build_report(out, effect, quarters_from)
    text = format_report(report)
    write_json(out / "report.json", report)
    write_text(out / "results.md", "# istune compare\n\n" + text)
    plot_curves(report, out / "curves.png")
    return text
