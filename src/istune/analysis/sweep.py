"""Tables 10, 11 and 4: sweep μ, sweep β, and the sparse-tuning ablation, resumable run by run.

    istune analyze sweep                                  # all three parts, SmolLM2-135M, 100 steps per run
    istune analyze sweep --parts mu --mu_values 1,10,100 --max_steps 40
    istune analyze sweep --seeds 1,2,3                    # repeat every run with three seeds

Parts (each run trains the same data sample, order and adapter init for a given seed):

* ``mu`` (Table 10): IST with μ in ``--mu_values`` at N_u = ``--update_layers``, with
  random sparse tuning at the same N_u as the baseline the paper puts beside it.
* ``beta`` (Table 11): IST with β in ``--beta_values``.
* ``ablation`` (Table 4): all layers (plain PEFT), random and IST at each N_u in
  ``--ablation_update_layers`` (the paper: 4 and 8).

Runs shared by parts (IST at μ=10, β=0.25, N_u=8 is in all three) train once. The
defaults are 12 runs of 100 steps: about 2 hours on 2 CPU cores for SmolLM2-135M.
Output: ``<out>/runs/<name>.json`` per run as it finishes, then ``sweep.json``,
``sweep.md`` and ``sweep.png``; a second call trains only what is missing.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from istune.analysis.training_runs import PlannedRun, TrainFn, TrainingSize, run_all
from istune.config import ISTConfig

PARTS = ("mu", "beta", "ablation")
RESULT_FILE, TABLE_FILE, PLOT_FILE = "sweep.json", "sweep.md", "sweep.png"
TITLES = {
    "mu": "μ, importance learning rate (paper Table 10)",
    "beta": "β, response suppression factor (paper Table 11)",
    "ablation": "sparse-tuning ablation (paper Table 4)",
}


def _config(option: str, value, **fields) -> ISTConfig:
    try:
        return ISTConfig(**fields)
    except ValueError as error:
        raise ValueError(f"--{option} has {value!r}, which is refused: {error}") from None


def plan_sweep(parts: Sequence[str], num_layers: int, *, mu_values: Sequence[float] = (0.1, 1, 10, 100, 1000),
               beta_values: Sequence[float] = (0.0, 0.1, 0.25, 0.5), update_layers: int = 8,
               ablation_update_layers: Sequence[int] = (4, 8), mu: float = 10.0, beta: float = 0.25,
               probe_interval: int = 10, seeds: Sequence[int] = (42,)
               ) -> tuple[list[PlannedRun], dict[str, list[dict]]]:
    """The runs of the chosen parts, and per part its table rows (label, swept value, run names by seed).

    Raises:
        ValueError: an unknown part, an empty list, or a value ISTConfig refuses (N_u above N_L,
            β outside [0, 1], ...).
    """
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise ValueError(f"--parts={','.join(parts)!r}: unknown sweep parameter {unknown or '(none given)'}; "
                         f"use some of {', '.join(PARTS)}.")
    for option, values in (("mu_values", mu_values), ("beta_values", beta_values),
                           ("ablation_update_layers", ablation_update_layers), ("seeds", seeds)):
        if not values:
            raise ValueError(f"--{option} is empty; give at least one value.")
    counts = [("update_layers", update_layers)] if {"mu", "beta"} & set(parts) else []
    counts += [("ablation_update_layers", u) for u in ablation_update_layers] if "ablation" in parts else []
    for option, count in counts:
        if not 1 <= count <= num_layers:
            raise ValueError(f"--{option} has N_u={count}, out of range: the model has N_L={num_layers} adapter "
                             f"layers; use 1 to {num_layers}.")
    runs: dict[str, PlannedRun] = {}

    def ist(u, mu_value, beta_value, seed, option, value):
        name = f"ist-u{u}-mu{mu_value:g}-beta{beta_value:g}-seed{seed}"
        runs.setdefault(name, PlannedRun(name, _config(option, value, strategy="ist", update_layers=u, mu=mu_value,
                                                       beta=beta_value, probe_interval=probe_interval, seed=seed)))
        return name

    def random_run(u, seed):
        name = f"random-u{u}-seed{seed}"
        runs.setdefault(name, PlannedRun(name, _config("seeds", seed, strategy="random", update_layers=u, seed=seed)))
        return name

    def all_layers(seed):
        name = f"all-seed{seed}"
        runs.setdefault(name, PlannedRun(name, _config("seeds", seed, strategy="all", seed=seed)))
        return name

    _config("probe_interval", probe_interval, probe_interval=probe_interval)
    _config("mu", mu, mu=mu)
    _config("beta", beta, beta=beta)
    rows: dict[str, list[dict]] = {}
    for part in parts:
        if part == "mu":
            rows[part] = [_row(f"random, N_u={update_layers}", None, [random_run(update_layers, s) for s in seeds])]
            rows[part] += [_row(f"IST μ={m:g}", m, [ist(update_layers, m, beta, s, "mu_values", m) for s in seeds])
                           for m in mu_values]
        elif part == "beta":
            rows[part] = [_row(f"IST β={b:g}", b, [ist(update_layers, mu, b, s, "beta_values", b) for s in seeds])
                          for b in beta_values]
        else:
            rows[part] = [_row(f"all layers ({num_layers})", None, [all_layers(s) for s in seeds])]
            for u in ablation_update_layers:
                rows[part].append(_row(f"random, N_u={u}", None, [random_run(u, s) for s in seeds]))
                rows[part].append(_row(f"IST, N_u={u}", None, [ist(u, mu, beta, s, "ablation_update_layers", u)
                                                                for s in seeds]))
    return list(runs.values()), rows


def _row(label: str, value: float | None, names: list[str]) -> dict:
    return {"label": label, "value": value, "runs": names}


def summarize(rows: dict[str, list[dict]], records: dict[str, dict]) -> dict[str, list[dict]]:
    """Per row: mean, min and max held-out loss over seeds, and mean option-scoring accuracy when measured."""
    summary = {}
    for part, part_rows in rows.items():
        summary[part] = []
        for row in part_rows:
            losses = [records[name]["heldout_loss"] for name in row["runs"]]
            accuracies = [records[name]["score_accuracy"] for name in row["runs"]
                          if records[name].get("score_accuracy") is not None]
            summary[part].append({**row, "losses": losses, "mean_loss": statistics.fmean(losses),
                                  "min_loss": min(losses), "max_loss": max(losses),
                                  "mean_accuracy": statistics.fmean(accuracies) if accuracies else None})
    return summary


def format_tables(summary: dict[str, list[dict]]) -> str:
    """One markdown table per part."""
    lines = []
    for part, part_rows in summary.items():
        lines += [f"### {TITLES[part]}", "",
                  "| setting | seeds | held-out loss (mean) | min – max | option-scoring acc. (%) |",
                  "|---|---|---|---|---|"]
        for row in part_rows:
            accuracy = f"{100 * row['mean_accuracy']:.1f}" if row["mean_accuracy"] is not None else "–"
            lines.append(f"| {row['label']} | {len(row['losses'])} | {row['mean_loss']:.4f} | "
                         f"{row['min_loss']:.4f} – {row['max_loss']:.4f} | {accuracy} |")
        lines.append("")
    return "\n".join(lines)


def run_sweep(out_dir: str, size: TrainingSize, parts: Sequence[str] = PARTS, *, train: TrainFn,
              keep_adapters: bool = False, argv: Sequence[str] = (), **plan) -> dict:
    """Check everything, train what is missing (one record per run, with ``train``), then write the JSON, table
    and plot.

    ``plan`` holds the keyword arguments of :func:`plan_sweep` after ``num_layers``.
    """
    from istune.analysis.plots import plot_sweep
    from istune.analysis.training_runs import check_size, count_adapter_layers, repo_root
    from istune.io import git_commit, write_text

    check_size(size)
    plan_sweep(parts, 10**9, **plan)  # refuse bad lists before the model is loaded
    num_layers = count_adapter_layers(size)
    planned, rows = plan_sweep(parts, num_layers, **plan)
    out = Path(out_dir)
    records = run_all(planned, size, out, command="sweep", argv=argv, train=train, keep_adapters=keep_adapters)
    summary = summarize(rows, records)
    result = {"num_layers": num_layers, "settings": records[planned[0].name]["settings"],
              "plan": {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in plan.items()},
              "parts": summary}
    header = (f"# IST sweeps: {size.model}, {size.method} rank {size.rank}, {size.max_steps} steps x batch "
              f"{size.batch_size}, N_L={num_layers}\n\n"
              f"Command: `istune analyze sweep {' '.join(argv)}`  \n"
              f"Commit: {git_commit(repo_root())}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  \n"
              f"Held-out answer loss on {size.heldout_samples} examples held out from the training mix "
              "(lower is better).\n\n")
    plot_sweep(summary, out / PLOT_FILE)
    write_text(out / TABLE_FILE, header + format_tables(summary))
    write_text(out / RESULT_FILE, json.dumps(result, indent=1))
    return result
