"""Pictures of a run: layer importance over training (the paper's Figure 4) and the per-step selection.

Both read the ``ist_log.jsonl`` that ISTCallback writes into the output folder::

    istune plot runs/my-run            # writes runs/my-run/importance.png and selection.png

The selection plot (steps x layers, black where a layer trained) is drawn for every selection rule,
so the rules' choices can be compared by eye; the importance plot only for runs that learn one ('ist').
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from istune.io import save_figure
from istune.recipe.run_file import read_run_file

LOG_FILE = "ist_log.jsonl"


def read_log(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Return the (selection events, probe events) of a run folder or a log file; other events are left out."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No IST log at {path}; give the output folder of `istune train` "
                                f"(it holds {LOG_FILE}) or the log file itself.")
    selections, probes = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error}).") from None
            if event.get("event") == "select":
                selections.append(event)
            elif event.get("event") == "probe":
                probes.append(event)
    return selections, probes


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``importance.png`` (importance per layer over probe steps) and ``selection.png``.

    Returns:
        The paths written (only the selection plot when the run had no probes, e.g. 'random').
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selections, probes = read_log(run_dir)
    if not selections:
        raise ValueError(f"The IST log in {run_dir} has no selection events: was the run empty?")
    out_dir = Path(out_dir or (run_dir if Path(run_dir).is_dir() else Path(run_dir).parent))
    out_dir.mkdir(parents=True, exist_ok=True)
    num_layers = max(max(e["selected"]) for e in selections) + 1
    if probes:
        num_layers = max(num_layers, len(probes[-1]["importance"]))
    written = []

    if probes:
        steps = [p["step"] for p in probes]
        importance = [[p["importance"][layer] for p in probes] for layer in range(num_layers)]
        figure, axis = plt.subplots(figsize=(8, max(3, 0.22 * num_layers)))
        image = axis.imshow(importance, aspect="auto", cmap="viridis", origin="lower",
                            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, num_layers - 0.5))
        axis.set(xlabel="optimizer step", ylabel="layer", title="Layer importance I over training")
        figure.colorbar(image, ax=axis, label="importance I")
        written.append(save_figure(figure, out_dir / "importance.png"))

    steps = [e["step"] for e in selections]
    chosen = [[1.0 if layer in e["selected"] else 0.0 for e in selections] for layer in range(num_layers)]
    figure, axis = plt.subplots(figsize=(8, max(3, 0.22 * num_layers)))
    axis.imshow(chosen, aspect="auto", cmap="Greys", origin="lower", interpolation="nearest",
                extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, num_layers - 0.5))
    strategy = read_run_file(Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent).get("ist", {})
    rule = f"'{strategy['strategy']}': " if "strategy" in strategy else ""
    axis.set(xlabel="optimizer step", ylabel="layer", title=f"{rule}layers trained at each step (black)")
    written.append(save_figure(figure, out_dir / "selection.png"))
    return written
