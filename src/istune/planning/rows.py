"""One row specification for every memory and time table: a configuration and its one key.

A row is what trains: the PEFT method, the IST options (None: every layer trains) and
gradient checkpointing. Its key spells exactly that, ``<method>[+ist|+random][+recompute][+gc][+stored<M>][:drop]``:

    lora               LoRA, every layer            lora+gc             ... with gradient checkpointing
    lora+ist           LoRA + IST (defaults)        lora+ist+gc:drop    ... + checkpointing, unselected state dropped
    lora+ist+stored8   IST, stored_layers=8         full+ist            whole decoder layers, drawn uniformly
    lisa               LISA: 2 whole layers + embeddings and head, state of the active layers only
    lora+badam         LoRA, N_u layers chosen by another selection rule (lisa, badam, owlore, gradnorm, probe-once)

Every table (``istune plan``, ``istune bench memory|time|frontier|gpu``) takes its rows from
:data:`ROWS`. The names the tables accepted before (``lora+ckpt``, ``lora:ckpt``, ``ist``, ...)
are input aliases (:data:`ALIASES`) of the one key; :func:`table_names` maps what a user types
to the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from istune import rule_catalog

__all__ = ["ALIASES", "METHOD_LABELS", "ROWS", "RULE_ROWS", "Row", "stored_row", "table_names"]

METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "series": "Series", "parallel": "Parallel", "full": "Full",
                 "lisa": "LISA"}


@dataclass(frozen=True)
class Row:
    """One configuration.

    Attributes:
        key: the one name of this configuration (JSON, ``--rows``).
        label: its name in tables.
        method: ``lora``, ``dora``, ``series``, ``parallel``, ``full`` (whole decoder layers) or ``lisa``
            (whole layers plus the embeddings and LM head, one sampling period).
        ist: None to train every layer; else ISTConfig options.
        checkpointing: transformers' gradient checkpointing (non-reentrant) on.
        baseline: the key of the row this one's memory ratio is taken against.
    """

    key: str
    label: str
    method: str = "lora"
    ist: dict | None = None
    checkpointing: bool = False
    baseline: str | None = None

    @property
    def probes(self) -> bool:
        """True when the row's tuner runs importance updates (a rule that runs IST's probes, as 'ist')."""
        if self.ist is None:
            return False
        rule = rule_catalog.traits(self.ist.get("strategy", "ist"))
        return rule is not None and rule.runs_importance_probes

    def with_method(self, method: str) -> Row:
        """This LoRA row for another adapter method (``istune plan --method``): key, label and baseline follow."""
        if self.method == method:
            return self
        def swap(text):
            return method + text[len(self.method):] if text and text.startswith(self.method) else text

        return dataclasses.replace(self, key=swap(self.key), method=method, baseline=swap(self.baseline),
                                   label=METHOD_LABELS[method] + self.label[len(METHOD_LABELS[self.method]):])


def _family(method: str) -> tuple[Row, ...]:
    """The plain, checkpointed and IST rows of an adapter method."""
    m, name = method, METHOD_LABELS[method]
    drop, recompute = {"unselected_optimizer_state": "drop"}, {"recompute_unselected": True}
    return (
        Row(m, name, m),
        Row(f"{m}+gc", f"{name} + gradient checkpointing", m, None, True, m),
        Row(f"{m}+ist", f"{name} + IST", m, {}, False, m),
        Row(f"{m}+ist+recompute", f"{name} + IST, recompute unselected", m, recompute, False, m),
        Row(f"{m}+ist+gc", f"{name} + IST + gradient checkpointing", m, {}, True, m),
        Row(f"{m}+ist:drop", f"{name} + IST, drop unselected state", m, drop, False, m),
        Row(f"{m}+ist+recompute:drop", f"{name} + IST, recompute + drop", m, {**recompute, **drop}, False, m),
        Row(f"{m}+ist+gc:drop", f"{name} + IST + gradient checkpointing, drop unselected state", m, drop, True, m),
        Row(f"{m}+random", f"{name} + random sparse", m, {"strategy": "random"}, False, m),
    )


def stored_row(stored_layers: int, checkpointing: bool, method: str = "lora", ist: dict | None = None) -> Row:
    """IST with ``stored_layers = M`` (M of the layers that run backward keep their activations), plus ``ist``."""
    ist = {**(ist or {}), "stored_layers": stored_layers}
    key = (f"{method}+ist{'+recompute' if ist.get('recompute_unselected') else ''}{'+gc' if checkpointing else ''}"
           f"+stored{stored_layers}{':drop' if ist.get('unselected_optimizer_state') == 'drop' else ''}")
    label = (f"{METHOD_LABELS[method]} + IST{' + gradient checkpointing' if checkpointing else ''}, "
             f"stored_layers={stored_layers}")
    return Row(key, label, method, ist, checkpointing, method)


# The peers' selection rules on LoRA (issue 24; docs/methods.md "Selection rules"), each with ISTConfig's defaults:
# K = 1, a new selection every step, so a short timing run sees each rule's spread of selections.
RULE_LABELS = {"lisa": "LISA (uniform)", "badam": "BAdam order (ascending blocks)",
               "owlore": "OwLore (outlier ratios)", "gradnorm": "gradient-norm sampling",
               "probe-once": "one-time gradient probe"}
RULE_ROWS = tuple(Row(f"lora+{rule}", f"LoRA + {label}", "lora", {"strategy": rule}, False, "lora")
                  for rule, label in RULE_LABELS.items())

# Full + IST draws uniformly ('random'): at zero importance that is what 'ist' draws too, and 'ist' on whole
# layers keeps a CPU copy of their initial weights, which the meta device cannot make.
_FULL_IST = {"strategy": "random"}
ROWS: dict[str, Row] = {row.key: row for row in (
    Row("full", "Full", "full"),
    Row("full+ist", "Full + IST", "full", _FULL_IST, False, "full"),
    Row("full+ist:drop", "Full + IST, drop unselected state", "full",
        {**_FULL_IST, "unselected_optimizer_state": "drop"}, False, "full"),
    Row("full+ist+recompute:drop", "Full + IST, recompute + drop", "full",
        {**_FULL_IST, "recompute_unselected": True, "unselected_optimizer_state": "drop"}, False, "full"),
    # LISA's paper: 2 whole layers a period, embeddings and head trained, AdamW state for the active layers only.
    Row("lisa", "LISA", "lisa", {"strategy": "random", "update_layers": 2, "unselected_optimizer_state": "drop"},
        False, "full"),
    # LISA-style in the frontier and time tables: 2 whole layers a step, embeddings and head frozen.
    Row("full+random2", "LISA-style (2 full layers)", "full", {"strategy": "random", "update_layers": 2}),
    *(row for method in ("lora", "dora", "series", "parallel") for row in _family(method)),
    Row("lora+ist+probe1", "LoRA + IST (probe batch 1)", "lora", {"probe_batch_size": 1}, False, "lora"),
    Row("lora+ist+recompute+probe1", "LoRA + IST (recompute unselected, probe batch 1)", "lora",
        {"recompute_unselected": True, "probe_batch_size": 1}, False, "lora"),
    *(stored_row(m, gc) for m, gc in ((3, True), (8, False), (2, True))),
    *RULE_ROWS,
)}

# Names the tables accepted before one key per configuration: each still works on the command line.
ALIASES: dict[str, str] = {
    "lora+ckpt": "lora+gc", "lora:ckpt": "lora+gc", "dora+ckpt": "dora+gc",
    "ist": "lora+ist", "random": "lora+random", "ist+recompute": "lora+ist+recompute", "ist-recompute":
    "lora+ist+recompute", "lora+ist:recompute": "lora+ist+recompute", "ist+gc": "lora+ist+gc",
    "ist+ckpt": "lora+ist+gc", "lora+ist:ckpt": "lora+ist+gc", "dora+ist+ckpt": "dora+ist+gc",
    "ist:drop": "lora+ist:drop", "ist+recompute:drop": "lora+ist+recompute:drop",
    "lora+ist:recompute+drop": "lora+ist+recompute:drop", "ist+gc:drop": "lora+ist+gc:drop",
    "full+ist:recompute+drop": "full+ist+recompute:drop", "ist-probe1": "lora+ist+probe1",
    "ist-recompute-probe1": "lora+ist+recompute+probe1", "ist+ckpt+stored3": "lora+ist+gc+stored3",
    "ist+stored8": "lora+ist+stored8", "ist+gc+stored2": "lora+ist+gc+stored2",
}


def table_names(keys: Iterable[str], local: dict[str, str] | None = None) -> dict[str, str]:
    """Every name a table accepts for its rows (their keys and the aliases of them) -> the key.

    ``local``: names one table gives another meaning than :data:`ALIASES` (the frontier's ``lisa``).
    """
    names = {key: key for key in keys}
    names.update({alias: key for alias, key in {**ALIASES, **(local or {})}.items() if key in names})
    return names
