"""Figure 2(a): remove a trained run's adapters one layer at a time and follow the held-out loss.

    istune analyze remove-layers runs/istune                 # every order, all layers
    istune analyze remove-layers runs/istune --orders greedy_least,greedy_most --heldout_samples 16

Removing a layer's adapter is eq. 8 with β = 0: its output is scaled to nothing, the
base layer is untouched (:func:`istune.core.suppress.suppress_layers`). Orders:

* ``importance_low_first`` / ``importance_high_first``: by the run's learned importance I.
* ``greedy_least`` / ``greedy_most``: at each step remove the layer whose removal raises
  the held-out loss least (most), given the layers already removed — the paper's greedy
  selection. It costs about N_L²/2 held-out evaluations per order.
* ``random``: a seeded random order, the baseline.

The greedy-most order ranks the layers by contribution (most important first); that
ranking is what ``istune analyze train-layers --ranking`` reads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

ORDERS = ("importance_low_first", "importance_high_first", "greedy_least", "greedy_most", "random")
RESULT_FILE = "layer_removal.json"
PLOT_FILE = "layer_removal.png"

LossOfRemoved = Callable[[Sequence[int]], float]  # held-out loss with the given layer positions removed


def importance_order(importance: Sequence[float], high_first: bool) -> list[int]:
    """Layer positions by importance I (ties: lower position first)."""
    sign = -1.0 if high_first else 1.0
    return sorted(range(len(importance)), key=lambda position: (sign * importance[position], position))


def random_order(num_layers: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(num_layers), num_layers)


def removal_curve(order: Sequence[int], loss_of_removed: LossOfRemoved) -> list[float]:
    """Held-out loss with the first 0, 1, ..., len(order) layers of ``order`` removed."""
    return [loss_of_removed(order[:count]) for count in range(len(order) + 1)]


def greedy_removal(num_layers: int, loss_of_removed: LossOfRemoved, remove: str = "least",
                   steps: int | None = None) -> tuple[list[int], list[float]]:
    """Greedy order: at each step remove the layer whose removal gives the lowest ('least') or highest ('most') loss.

    Args:
        num_layers: N_L; positions are 0..N_L-1.
        loss_of_removed: held-out loss with a set of positions removed.
        remove: 'least' (the layer that matters least goes first) or 'most'.
        steps: stop after this many removals (default N_L).

    Returns:
        (removed positions in order, losses with 0, 1, ..., steps removed). Ties go to
        the lower position.
    """
    if remove not in ("least", "most"):
        raise ValueError(f"remove={remove!r}: use 'least' or 'most'.")
    steps = num_layers if steps is None else steps
    removed: list[int] = []
    losses = [loss_of_removed([])]
    for _ in range(steps):
        candidates = [(loss_of_removed(removed + [position]), position)
                      for position in range(num_layers) if position not in removed]
        if remove == "least":
            loss, chosen = min(candidates, key=lambda item: (item[0], item[1]))
        else:
            loss, chosen = max(candidates, key=lambda item: (item[0], -item[1]))
        removed.append(chosen)
        losses.append(loss)
    return removed, losses


def cached(loss_of_removed: LossOfRemoved) -> tuple[LossOfRemoved, dict]:
    """The same function, evaluating each set of removed layers once (orders share their prefixes)."""
    cache: dict[frozenset, float] = {}

    def loss(removed: Sequence[int]) -> float:
        key = frozenset(removed)
        if key not in cache:
            cache[key] = loss_of_removed(removed)
        return cache[key]

    return loss, cache


def heldout_loss_of_removed(loaded, batch_size: int = 8) -> LossOfRemoved:
    """Held-out loss of a loaded run with the adapters of some layer positions scaled to 0 (eq. 8, β = 0)."""
    from istune.core.suppress import suppress_layers
    from istune.eval.loss import heldout_loss

    def loss(removed: Sequence[int]) -> float:
        with suppress_layers([loaded.layers[position] for position in removed], 0.0):
            return heldout_loss(loaded.model, loaded.heldout, loaded.collate, batch_size)

    return loss


def default_orders(importance: Sequence[float] | None) -> list[str]:
    return [order for order in ORDERS if importance is not None or not order.startswith("importance")]


def check_orders(orders: Sequence[str], run_dir: str, strategy: str, has_importance: bool) -> None:
    unknown = [order for order in orders if order not in ORDERS]
    if unknown:
        raise ValueError(f"--orders has unknown {unknown}; use some of {', '.join(ORDERS)}.")
    if not orders:
        raise ValueError(f"--orders is empty; use some of {', '.join(ORDERS)}.")
    if not has_importance and any(order.startswith("importance") for order in orders):
        raise ValueError(f"--orders asks for an importance order, but run {run_dir!r} trained with strategy "
                         f"{strategy!r}, which learns no importance; drop the importance_* orders or give an IST run.")


def remove_layers(run_dir: str, out_dir: str | None = None, orders: Sequence[str] | None = None,
                  max_removed: int | None = None, heldout_samples: int | None = None, seed: int = 0,
                  metric: str = "perplexity", batch_size: int = 8, argv: Sequence[str] = ()) -> dict:
    """Run the removal orders on a trained run; write ``layer_removal.json`` and ``layer_removal.png``.

    Returns:
        The JSON record: per order the removed positions and the loss and perplexity
        after 0, 1, ... removals; ``ranking`` (most important first) from the greedy search.
    """
    import json

    from istune.analysis.plots import plot_removal
    from istune.analysis.run_folder import learned_importance, load_run, read_results
    from istune.analysis.training_runs import repo_root
    from istune.io import run_metadata, write_text

    results = read_results(run_dir)
    importance = learned_importance(results)
    orders = list(orders) if orders is not None else default_orders(importance)
    check_orders(orders, run_dir, results["ist"]["strategy"], importance is not None)
    if metric not in ("loss", "perplexity"):
        raise ValueError(f"--metric={metric!r}: use 'loss' or 'perplexity'.")
    if max_removed is not None and max_removed < 1:
        raise ValueError(f"--max_removed={max_removed} must be at least 1 (or left unset for all layers).")
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} must be at least 1.")
    loaded = load_run(run_dir, heldout_samples)
    num_layers = len(loaded.layers)
    if max_removed is not None and max_removed > num_layers:
        raise ValueError(f"--max_removed={max_removed} is more than the run's N_L={num_layers} adapter layers; "
                         f"use at most {num_layers}.")
    if importance is not None and len(importance) != num_layers:
        raise ValueError(f"{run_dir}/results.json has {len(importance)} importance values "
                         f"for N_L={num_layers} layers.")
    steps = max_removed or num_layers
    loss, cache = cached(heldout_loss_of_removed(loaded, batch_size))

    record: dict = {"run_dir": str(run_dir), "num_layers": num_layers,
                    "layer_names": [layer.name for layer in loaded.layers],
                    "heldout_examples": len(loaded.heldout), "importance": importance, "orders": {}}
    for order_name in orders:
        print(f"istune analyze remove-layers: order {order_name}", flush=True)
        if order_name.startswith("greedy"):
            removed, losses = greedy_removal(num_layers, loss, order_name.split("_")[1], steps)
        else:
            full = (importance_order(importance, order_name == "importance_high_first")
                    if order_name.startswith("importance") else random_order(num_layers, seed))
            removed = full[:steps]
            losses = removal_curve(removed, loss)
        record["orders"][order_name] = {"removed": removed, "loss": losses,
                                        "perplexity": [math.exp(min(value, 700.0)) for value in losses]}
    record["loss_without_removal"] = loss([])
    record["single_removal_loss"] = {str(p): cache[frozenset([p])]
                                     for p in range(num_layers) if frozenset([p]) in cache}
    record["ranking"] = _greedy_ranking(record["orders"], num_layers)
    record["evaluations"] = len(cache)
    record["metadata"] = run_metadata("-m istune analyze remove-layers", list(argv), repo_root())

    out = Path(out_dir) if out_dir else Path(run_dir) / "layer_removal"
    plot_removal(record, out / PLOT_FILE, metric)
    write_text(out / RESULT_FILE, json.dumps(record, indent=1))  # last: the JSON means the analysis finished
    return record


def _greedy_ranking(orders: dict, num_layers: int) -> list[int] | None:
    """Layers by contribution, most important first: greedy-most's order, else greedy-least's reversed."""
    if len(orders.get("greedy_most", {}).get("removed", [])) == num_layers:
        return list(orders["greedy_most"]["removed"])
    if len(orders.get("greedy_least", {}).get("removed", [])) == num_layers:
        return list(reversed(orders["greedy_least"]["removed"]))
    return None


def format_removal(record: dict, metric: str = "perplexity") -> str:
    """A short text table: the metric after 0, 1/4, 1/2, 3/4 and all of the removals, per order."""
    lines = [f"{'order':<24}" + "".join(f"{'-' + str(c):>10}" for c in _milestones(record)) + "   (layers removed)"]
    for name, order in record["orders"].items():
        values = order[metric]
        lines.append(f"{name:<24}" + "".join(f"{values[c]:>10.3f}" if c < len(values) else f"{'':>10}"
                                             for c in _milestones(record)))
    if record.get("ranking"):
        lines.append(f"greedy ranking (most important first): {record['ranking']}")
    return "\n".join(lines)


def _milestones(record: dict) -> list[int]:
    longest = max(len(order["loss"]) for order in record["orders"].values()) - 1
    return sorted({0, longest // 4, longest // 2, 3 * longest // 4, longest})
