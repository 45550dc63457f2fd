"""Figure 2(b): fine-tune only chosen layers and compare the held-out loss.

    istune analyze train-layers --ranking runs/istune/layer_removal/layer_removal.json --k_values 1,2,4,8
    istune analyze train-layers --ranking runs/istune --kinds top,all          # rank by the run's importance I
    istune analyze train-layers --layer_sets "0,1;29" --kinds all

Each set trains with ``ISTConfig(strategy="fixed", layers=[...])``: those layers' adapters
at every step, the others never. Sets: the k most important layers (``top``), the k
least important (``bottom``) for each k, all layers (``all``, plain PEFT), and any
explicit ``--layer_sets``. The ranking is the greedy one of ``remove-layers`` (its JSON)
or a run's learned importance (its folder). Runs are resumable: see
:mod:`istune.analysis.training_runs`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from istune.analysis.training_runs import PlannedRun, TrainFn, TrainingSize, run_all
from istune.config import ISTConfig

KINDS = ("top", "bottom", "all")
RESULT_FILE = "layer_training.json"
PLOT_FILE = "layer_training.png"


def read_ranking(source: str) -> list[int]:
    """Layer positions, most important first, from a ``layer_removal.json`` or an IST run folder."""
    from istune.analysis.removal import importance_order
    from istune.analysis.run_folder import learned_importance, read_results

    path = Path(source)
    if path.is_file():
        try:
            ranking = json.loads(path.read_text()).get("ranking")
        except (json.JSONDecodeError, AttributeError):
            ranking = None
        if not ranking:
            raise ValueError(f"--ranking={source!r} holds no complete 'ranking'; give the layer_removal.json of "
                             "`istune analyze remove-layers` run with a greedy order over all layers, "
                             "or an IST run folder.")
        return [int(position) for position in ranking]
    if not path.is_dir():
        raise ValueError(f"--ranking={source!r} is neither a layer_removal.json file nor a run folder; "
                         "check the path.")
    results = read_results(path, option="--ranking")
    importance = learned_importance(results)
    if importance is None:
        raise ValueError(f"--ranking={source!r} is a run with strategy {results['ist']['strategy']!r}, which learns "
                         "no importance; give an IST run folder or a layer_removal.json.")
    return importance_order(importance, high_first=True)


def parse_layer_sets(text: str | None) -> list[list[int]]:
    """``"0,1;5"`` -> [[0, 1], [5]]."""
    if text is None:
        return []
    sets = []
    for part in text.split(";"):
        try:
            layers = [int(item) for item in part.split(",") if item.strip()]
        except ValueError:
            raise ValueError(f"--layer_sets={text!r}: {part!r} is not a comma-separated list of layer positions; "
                             "write e.g. --layer_sets \"0,1;5\".") from None
        if not layers:
            raise ValueError(f"--layer_sets={text!r} has an empty set; write e.g. --layer_sets \"0,1;5\".")
        if len(set(layers)) != len(layers):
            raise ValueError(f"--layer_sets={text!r}: {part!r} repeats a layer; give each layer once.")
        sets.append(layers)
    return sets


def plan_layer_sets(num_layers: int, ranking: list[int] | None, kinds: Sequence[str], k_values: Sequence[int],
                    layer_sets: Sequence[list[int]], seed: int) -> list[PlannedRun]:
    """The runs for the chosen sets, each checked against N_L (positions 0..N_L-1)."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds={','.join(kinds)!r}: use some of {', '.join(KINDS)}.")
    needs_ranking = any(kind in ("top", "bottom") for kind in kinds)
    if needs_ranking and ranking is None:
        raise ValueError("--kinds top/bottom need --ranking (a layer_removal.json or an IST run folder); "
                         "or use --kinds all with --layer_sets.")
    if ranking is not None and sorted(ranking) != list(range(num_layers)):
        raise ValueError(f"--ranking orders {len(ranking)} layers {sorted(ranking)[:6]}..., but the model has "
                         f"N_L={num_layers} adapter layers (0..{num_layers - 1}); "
                         "give a ranking made for this model and method.")
    for k in k_values if needs_ranking else []:
        if not 1 <= k <= num_layers:
            raise ValueError(f"--k_values has k={k}, out of range: the model has N_L={num_layers} adapter layers; "
                             f"use values from 1 to {num_layers}.")
    for layers in layer_sets:
        outside = [position for position in layers if not 0 <= position < num_layers]
        if outside:
            raise ValueError(f"--layer_sets has layers {outside}, out of range: the model has N_L={num_layers} "
                             f"adapter layers (0..{num_layers - 1}).")
    planned = []
    for kind in kinds:
        if kind == "all":
            planned.append(PlannedRun(f"all-seed{seed}", ISTConfig(strategy="all", seed=seed),
                                      {"kind": "all", "k": num_layers, "layers": list(range(num_layers))}))
            continue
        for k in k_values:
            layers = sorted(ranking[:k] if kind == "top" else ranking[-k:])
            planned.append(PlannedRun(f"{kind}{k}-{_joined(layers)}-seed{seed}",
                                      ISTConfig(strategy="fixed", layers=layers, seed=seed),
                                      {"kind": kind, "k": k, "layers": layers}))
    for layers in layer_sets:
        planned.append(PlannedRun(f"set-{_joined(sorted(layers))}-seed{seed}",
                                  ISTConfig(strategy="fixed", layers=sorted(layers), seed=seed),
                                  {"kind": "set", "k": len(layers), "layers": sorted(layers)}))
    unique = {run.name: run for run in planned}  # top-k and bottom-k can coincide (k = N_L)
    return list(unique.values())


def train_layer_sets(out_dir: str, size: TrainingSize, ranking_source: str | None = None,
                     kinds: Sequence[str] = KINDS, k_values: Sequence[int] = (1, 2, 4, 8),
                     layer_sets: Sequence[list[int]] = (), seed: int = 42, keep_adapters: bool = False,
                     argv: Sequence[str] = (), *, train: TrainFn) -> dict:
    """Train every set (resuming, with ``train``), then write ``layer_training.json`` and ``layer_training.png``
    into ``out_dir``."""
    from istune.analysis.plots import plot_layer_sets
    from istune.analysis.training_runs import check_size, count_adapter_layers
    from istune.io import write_text

    check_size(size)
    ranking = read_ranking(ranking_source) if ranking_source is not None else None
    num_layers = count_adapter_layers(size)
    planned = plan_layer_sets(num_layers, ranking, list(kinds), list(k_values), list(layer_sets), seed)
    out = Path(out_dir)
    records = run_all(planned, size, out, command="train-layers", argv=argv, train=train,
                      keep_adapters=keep_adapters)
    rows = [{"name": run.name, **run.labels, "heldout_loss": records[run.name]["heldout_loss"],
             "score_accuracy": records[run.name]["score_accuracy"]} for run in planned]
    result = {"num_layers": num_layers, "ranking": ranking, "ranking_source": ranking_source, "seed": seed,
              "settings": records[planned[0].name]["settings"], "rows": rows}
    plot_layer_sets(rows, out / PLOT_FILE)
    write_text(out / RESULT_FILE, json.dumps(result, indent=1))
    return result


def format_layer_sets(result: dict) -> str:
    lines = [f"{'set':<10}{'k':>4}  {'held-out loss':>14}  {'acc. (%)':>9}  layers", "-" * 60]
    for row in result["rows"]:
        accuracy = f"{100 * row['score_accuracy']:.1f}" if row["score_accuracy"] is not None else "-"
        lines.append(f"{row['kind']:<10}{row['k']:>4}  {row['heldout_loss']:>14.4f}  {accuracy:>9}  {row['layers']}")
    return "\n".join(lines)


def _joined(layers: Sequence[int]) -> str:
    import hashlib

    text = "_".join(str(position) for position in layers)
    return text if len(text) <= 60 else f"{len(layers)}layers-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
