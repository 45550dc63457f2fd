"""The analyses' figures (matplotlib, Agg backend), each written whole or not at all."""

from __future__ import annotations

from pathlib import Path

from istune.io import save_figure

ORDER_LABELS = {
    "importance_low_first": "by IST importance, least important first",
    "importance_high_first": "by IST importance, most important first",
    "greedy_least": "greedy, least loss increase first",
    "greedy_most": "greedy, most loss increase first",
    "random": "random order",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_removal(record: dict, path: Path, metric: str = "perplexity") -> Path:
    """Figure 2(a): the metric against the number of layers whose adapters are removed, one line per order."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, order in record["orders"].items():
        values = order[metric]
        axis.plot(range(len(values)), values, marker="o", markersize=3, label=ORDER_LABELS.get(name, name))
    if metric == "perplexity":
        axis.set_yscale("log")
    axis.set(xlabel="adapter layers removed (β = 0)", ylabel=f"held-out {metric}",
             title=f"Removing trained adapters layer by layer (N_L = {record['num_layers']})")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_layer_sets(rows: list[dict], path: Path) -> Path:
    """Figure 2(b): held-out loss of training only the top-k / bottom-k layers against k, and all layers."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for kind, style in (("top", "o-"), ("bottom", "s-")):
        points = sorted((row["k"], row["heldout_loss"]) for row in rows if row["kind"] == kind)
        if points:
            axis.plot([k for k, _ in points], [loss for _, loss in points], style,
                      label=f"{'most' if kind == 'top' else 'least'} important k layers")
    for row in rows:
        if row["kind"] == "all":
            axis.axhline(row["heldout_loss"], color="grey", linestyle="--", label=f"all {row['k']} layers")
        elif row["kind"] == "set":
            axis.plot([row["k"]], [row["heldout_loss"]], "x", label=f"layers {row['layers']}")
    axis.set(xlabel="layers trained (k)", ylabel="held-out answer loss", title="Training only chosen layers")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_sweep(parts: dict[str, list[dict]], path: Path) -> Path:
    """Tables 10, 11, 4 as panels: loss against μ (log axis), against β, and the ablation's bars."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(parts), figsize=(4.5 * len(parts), 3.8), squeeze=False)
    for axis, (part, rows) in zip(axes[0], parts.items()):
        if part in ("mu", "beta"):
            points = [(row["value"], row) for row in rows if row["value"] is not None]
            axis.errorbar([v for v, _ in points], [r["mean_loss"] for _, r in points],
                          yerr=[[r["mean_loss"] - r["min_loss"] for _, r in points],
                                [r["max_loss"] - r["mean_loss"] for _, r in points]], fmt="o-", capsize=3, label="IST")
            for row in rows:
                if row["value"] is None:
                    axis.axhline(row["mean_loss"], color="grey", linestyle="--", label=row["label"])
            if part == "mu":
                axis.set_xscale("log")
            axis.set(xlabel="μ (importance learning rate)" if part == "mu" else "β (response suppression)",
                     ylabel="held-out answer loss",
                     title="μ sweep (Table 10)" if part == "mu" else "β sweep (Table 11)")
            axis.legend(fontsize=8)
        else:
            labels = [row["label"] for row in rows]
            axis.bar(range(len(rows)), [row["mean_loss"] for row in rows], color="tab:blue")
            axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
            low = min(row["min_loss"] for row in rows)
            high = max(row["max_loss"] for row in rows)
            axis.set_ylim(low - 0.1 * (high - low + 1e-9) - 1e-3, high + 0.1 * (high - low + 1e-9) + 1e-3)
            axis.set(ylabel="held-out answer loss", title="Sparse-tuning ablation (Table 4)")
    return save_figure(figure, path)
