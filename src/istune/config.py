"""ISTConfig: the hyperparameters of Importance-aware Sparse Tuning.

Defaults are the paper's (Table 8 and the method section). Values that can be checked
without a model are checked at construction; values that depend on the model (N_u > N_L,
a fixed layer index out of range) are checked by :meth:`ISTConfig.resolve` when training
starts, before any step.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields

# The built-in selection rules (istune.core.rules registers each under this name); more can be registered
# with istune.core.selection.register_rule.
STRATEGIES = ("ist", "random", "fixed", "all", "lisa", "badam", "owlore", "gradnorm", "probe-once")
BLOCK_ORDERS = ("ascending", "descending", "random")
PROBES = ("gradient", "suppression")
# The rules each rule parameter applies to; any other built-in rule refuses a value other than the default.
RULE_PARAMETERS = {
    "switch_interval": ("ist", "random", "lisa", "badam", "owlore", "gradnorm"),
    "block_order": ("badam",),
    "outlier_threshold": ("owlore",),
    "calibration_interval": ("owlore",),
    "exploration": ("gradnorm",),
    "gradnorm_decay": ("gradnorm",),
    "probe_by": ("probe-once",),
}
OPTIMIZER_STATE_POLICIES = ("keep", "offload", "drop")
REWARD_SCALES = ("paper", "spread")


@dataclass
class ISTConfig:
    """Configuration of the sparse-tuning controller.

    Example:
        >>> ISTConfig()                        # the paper: 25% of layers per step, IST policy
        >>> ISTConfig(strategy="random")       # random sparse tuning baseline
        >>> ISTConfig(strategy="fixed", layers=[0, 5, 11])
        >>> ISTConfig(strategy="lisa", update_layers=2, switch_interval=50)   # LISA (Pan et al. 2024)
    """

    strategy: str = field(
        default="ist",
        metadata={"help": "The selection rule, how the layers trained each step are chosen: 'ist' (importance-aware, "
                  "the paper), 'random' (uniform N_u layers), 'lisa' (uniform, LISA, Pan et al. 2024), 'badam' "
                  "(blocks of N_u consecutive layers in turn, BAdam, Luo et al. 2024), 'owlore' (by outlier ratio, "
                  "OwLore, Li et al. 2024), 'gradnorm' (by a running estimate of the gradient norm), 'probe-once' "
                  "(N_u layers picked by a probe at step 0), 'fixed' (always `layers`), 'all' (plain PEFT), or a "
                  "rule registered with istune.core.selection.register_rule. See docs/methods.md, Selection rules."},
    )
    update_fraction: float | None = field(
        default=None,
        metadata={"help": "N_u as a fraction of N_L: layers whose adapters train each step. "
                  "Default 0.25 (8 of 32 in the paper). Give this or `update_layers`, not both."},
    )
    update_layers: int | None = field(
        default=None, metadata={"help": "N_u as a number of layers. Give this or `update_fraction`, not both."}
    )
    probe_fraction: float | None = field(
        default=None,
        metadata={"help": "N_v as a fraction of N_L: layers kept at full response in each probe candidate. "
                  "Default 0.5. Give this or `probe_layers`, not both."},
    )
    probe_layers: int | None = field(
        default=None, metadata={"help": "N_v as a number of layers. Give this or `probe_fraction`, not both."}
    )
    num_probes: int = field(
        default=3, metadata={"help": "N_c: probe candidates per importance update (default 3)."}
    )
    probe_interval: int = field(
        default=10, metadata={"help": "T_c: run the importance-updating loop every T_c optimizer steps (default 10)."}
    )
    beta: float = field(
        default=0.25,
        metadata={"help": "β: response suppression factor in [0, 1] for adapters outside a probe candidate "
                  "(default 0.25)."},
    )
    mu: float = field(
        default=10.0,
        metadata={"help": "μ: importance learning rate (10 for commonsense, 100 for math in the paper)."},
    )
    reward_scale: str = field(
        default="paper",
        metadata={"help": "Scale of the rewards r_j (eq. 9) before I_i += μ·r_j (eq. 10): 'paper' uses them as they "
                  "are, so a good μ depends on the task's loss level (10 commonsense, 100 math); 'spread' divides "
                  "them by their root mean square over the N_c candidates, so μ is in units of that spread and one "
                  "value can serve every task (try μ = 0.1; not in the paper)."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of istune's own RNG (selections, candidates, probe batches)."}
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Layer positions (0-based) to train with strategy 'fixed'."}
    )
    layers_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path of the decoder-layer list (e.g. 'base_model.model.model.layers'); "
                  "found by structure when not given."},
    )
    probe_batch_size: int | None = field(
        default=None, metadata={"help": "Examples in the probe batch; default: the training batch size per device."}
    )
    switch_interval: int = field(
        default=1,
        metadata={"help": "K: keep each selection for K optimizer steps; the rule chooses again at steps 0, K, 2K, "
                  "... 'ist': the importance-sampled set is held K steps (the probes still run every T_c steps); "
                  "'random' and 'lisa': LISA's sampling period K (Pan et al. 2024); 'badam': BAdam's "
                  "switch_block_every (Luo et al. 2024); 'owlore', 'gradnorm': steps between draws. 'fixed', 'all' "
                  "and 'probe-once' never change their layers and take no K. Default 1: a new selection every step."},
    )
    block_order: str = field(
        default="ascending",
        metadata={"help": "BAdam's switch_mode (Luo et al. 2024), the order in which the blocks of N_u consecutive "
                  "layers train: 'ascending' (the bottom block first, default), 'descending' (the top block "
                  "first), 'random' (a fresh permutation of the blocks at every pass). Only for strategy 'badam'."},
    )
    outlier_threshold: float = field(
        default=13.0,
        metadata={"help": "M: OwLore (Li et al. 2024) counts a weight x input-activation score as an outlier above "
                  "M x its layer's mean; layers are sampled in proportion to their share of outliers. Default 13 "
                  "(OwLore's LLaMA-2 ratios; OWL prunes with 5). Only for strategy 'owlore'."},
    )
    calibration_interval: int = field(
        default=0,
        metadata={"help": "R: OwLore re-measures the outlier ratios every R optimizer steps; 0 (default) measures "
                  "them once, at the first step, as OwLore does. Only for strategy 'owlore'."},
    )
    exploration: float = field(
        default=0.1,
        metadata={"help": "ε in [0, 1]: the uniform share of the 'gradnorm' probabilities, p_i = (1 - ε)·g_i/Σg + "
                  "ε/N_L, so every layer is revisited (an ε-mixture in place of MISA's bandit weights; MISA 2025, "
                  "GRASS 2026). 0: gradient norms alone, 1: uniform. Default 0.1. Only for strategy 'gradnorm'."},
    )
    gradnorm_decay: float = field(
        default=0.9,
        metadata={"help": "γ in [0, 1): the weight a layer's gradient-norm estimate keeps when the layer trains, "
                  "g_i <- γ·g_i + (1 - γ)·|grad_i| (an EMA, as MISA 2025). Default 0.9. Only for strategy "
                  "'gradnorm'."},
    )
    probe_by: str = field(
        default="gradient",
        metadata={"help": "How 'probe-once' (after Aletheia 2026) picks its N_u layers at step 0: 'gradient' "
                  "(default: the largest adapter-gradient norms) or 'suppression' (IST's eq. 8 probe with each "
                  "layer alone at full response: the lowest losses). Only for strategy 'probe-once'."},
    )

    recompute_unselected: bool = field(
        default=False,
        metadata={"help": "Activation checkpointing of the layers not in S this step: they keep only their inputs "
                  "and run their forward again in the backward pass. Saves most of their activation memory for "
                  "one more forward of those layers (not in the paper)."},
    )
    stored_layers: int | None = field(
        default=None,
        metadata={"help": "Of the layers that run the backward pass this step (the lowest layer in S and every one "
                  "above it), how many keep their activations; the others keep only their inputs and run their "
                  "forward again in the backward pass (the top layer first, then layers not in S: they keep less). "
                  "Works with and without the Trainer's gradient checkpointing: 0 recomputes them all, a larger "
                  "number trades memory for time. Default: leave it to gradient checkpointing and "
                  "recompute_unselected (not in the paper)."},
    )
    unselected_optimizer_state: str = field(
        default="keep",
        metadata={"help": "Optimizer state (e.g. Adam moments) of layers not in S: 'keep' (the paper), 'offload' "
                  "(to CPU while unselected; same updates), or 'drop' (fresh moments when selected again)."},
    )

    def __post_init__(self) -> None:
        names = strategy_names()
        if self.strategy not in names:
            _fail("strategy", self.strategy, f"use one of {', '.join(repr(s) for s in names)}, or register a rule "
                  "with istune.core.selection.register_rule(name, factory) before building the config")
        self._check_rule_parameters()
        _check_pair(self, "update_fraction", "update_layers")
        _check_pair(self, "probe_fraction", "probe_layers")
        for name in ("num_probes", "probe_interval"):
            _check_count(self, name)
        if self.strategy == "ist" and self.num_probes == 1:
            _fail("num_probes", 1, "with one candidate eq. 9's reward exp(-L) - mean(exp(-L)) is always 0 and the "
                  "importance never moves; use N_c >= 2 (the paper: 3)")
        if self.probe_batch_size is not None:
            _check_count(self, "probe_batch_size")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            _fail("beta", self.beta, "β must be a number in [0, 1]; the paper uses 0.25")
        if (isinstance(self.mu, bool) or not isinstance(self.mu, (int, float))
                or not (math.isfinite(self.mu) and self.mu > 0)):
            _fail("mu", self.mu, "μ must be a finite number > 0; the paper uses 10 (commonsense) or 100 (math)")
        if self.reward_scale not in REWARD_SCALES:
            _fail("reward_scale", self.reward_scale, f"use one of {', '.join(repr(s) for s in REWARD_SCALES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "use an integer")
        if not isinstance(self.recompute_unselected, bool):
            _fail("recompute_unselected", self.recompute_unselected, "use true or false")
        if self.recompute_unselected and self.strategy == "all":
            _fail("recompute_unselected", True, "strategy 'all' trains every layer, so no layer is unselected; "
                  "use the model's gradient checkpointing instead, or a sparse strategy")
        if self.stored_layers is not None:
            if (isinstance(self.stored_layers, bool) or not isinstance(self.stored_layers, int)
                    or self.stored_layers < 0):
                _fail("stored_layers", self.stored_layers, "use a number of layers >= 0, or leave it unset")
            if self.recompute_unselected:
                _fail("stored_layers", self.stored_layers, "recompute_unselected=True already decides which layers "
                      "are recomputed (those not in S); set only one of the two")
        if self.unselected_optimizer_state not in OPTIMIZER_STATE_POLICIES:
            _fail("unselected_optimizer_state", self.unselected_optimizer_state,
                  f"use one of {', '.join(repr(p) for p in OPTIMIZER_STATE_POLICIES)}")
        if self.strategy == "fixed":
            if not self.layers:
                _fail("layers", self.layers, "strategy 'fixed' needs a non-empty list of layer positions, e.g. [0, 5]")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                _fail("layers", self.layers, "layer positions are integers >= 0")
            if len(set(self.layers)) != len(self.layers):
                _fail("layers", self.layers, "remove the repeated positions")
            if self.update_fraction is not None or self.update_layers is not None:
                _fail("update_layers", self.update_layers or self.update_fraction,
                      "strategy 'fixed' trains exactly `layers`; leave update_layers/update_fraction unset")
        elif self.layers is not None:
            _fail("layers", self.layers,
                  f"`layers` only applies to strategy 'fixed', not {self.strategy!r}; remove it")

    def _check_rule_parameters(self) -> None:
        """The selection rules' parameters: in range, and set only for a rule that uses them."""
        _check_count(self, "switch_interval")
        if self.block_order not in BLOCK_ORDERS:
            _fail("block_order", self.block_order, f"use one of {', '.join(map(repr, BLOCK_ORDERS))}")
        if not is_finite_number(self.outlier_threshold) or self.outlier_threshold <= 0:
            _fail("outlier_threshold", self.outlier_threshold, "OwLore's outlier multiplier M must be a finite "
                  "number > 0 (OwLore: 13, OWL: 5)")
        if isinstance(self.calibration_interval, bool) or not isinstance(self.calibration_interval, int) \
                or self.calibration_interval < 0:
            _fail("calibration_interval", self.calibration_interval, "R must be an integer >= 0 (steps between "
                  "measurements of the outlier ratios; 0 measures them once, at the start)")
        if not is_finite_number(self.exploration) or not 0 <= self.exploration <= 1:
            _fail("exploration", self.exploration, "ε, the uniform share of the layer probabilities, must lie in "
                  "[0, 1] (0: gradient norms alone, 1: uniform; default 0.1)")
        if not is_finite_number(self.gradnorm_decay) or not 0 <= self.gradnorm_decay < 1:
            _fail("gradnorm_decay", self.gradnorm_decay, "γ, the weight an estimate keeps at each observation, "
                  "must lie in [0, 1) (default 0.9)")
        if self.probe_by not in PROBES:
            _fail("probe_by", self.probe_by, f"use one of {', '.join(map(repr, PROBES))}")
        if self.strategy not in STRATEGIES:
            return  # a registered rule of the user's own: it may read any of them
        defaults = {f.name: f.default for f in fields(self)}
        for name, rules in RULE_PARAMETERS.items():
            if self.strategy not in rules and getattr(self, name) != defaults[name]:
                _fail(name, getattr(self, name), f"`{name}` only applies to strategy "
                      f"{' or '.join(map(repr, rules))}, not {self.strategy!r}; remove it")

    def resolve(self, num_layers: int) -> ResolvedCounts:
        """Turn fractions into layer counts for a model with ``num_layers`` adapter layers (N_L).

        Raises:
            ValueError: when a count exceeds N_L or a fixed layer is out of range.
        """
        if self.strategy == "fixed":
            out_of_range = [i for i in self.layers if i >= num_layers]
            if out_of_range:
                _fail("layers", self.layers,
                      f"positions {out_of_range} are out of range: the model has N_L={num_layers} adapter layers "
                      f"(0..{num_layers - 1})")
            update = len(self.layers)
        elif self.strategy == "all":
            update = num_layers
        else:
            update = _layer_count(self, "update_fraction", "update_layers", 0.25, num_layers)
        probe = _layer_count(self, "probe_fraction", "probe_layers", 0.5, num_layers)
        return ResolvedCounts(num_layers=num_layers, update_layers=update, probe_layers=probe)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ResolvedCounts:
    """Layer counts for one model: N_L, N_u and N_v."""

    num_layers: int
    update_layers: int
    probe_layers: int


def strategy_names() -> list[str]:
    """The names ``ISTConfig.strategy`` accepts: the built-in rules and any registered since, sorted.

    A rule is registered through :mod:`istune.core.selection`; until that module is loaded no rule can
    have been, so the built-in names are all there are (the config does not import the core).
    """
    selection = sys.modules.get("istune.core.selection")
    registered = selection.rule_names() if selection is not None else []
    return sorted(set(STRATEGIES) | set(registered))


def is_finite_number(value) -> bool:
    """A real int or float (not a bool), finite: the check every numeric rule parameter shares."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(name: str, value, fix: str):
    raise ValueError(f"ISTConfig.{name}={value!r} is invalid: {fix}.")


def _check_count(config: ISTConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(name, value, "use an integer >= 1")


def _check_pair(config: ISTConfig, fraction_name: str, count_name: str) -> None:
    fraction, count = getattr(config, fraction_name), getattr(config, count_name)
    if fraction is not None and count is not None:
        _fail(count_name, count,
              f"give either {fraction_name} or {count_name}, not both ({fraction_name}={fraction!r})")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        _fail(fraction_name, fraction, "a fraction of the layers must be in (0, 1]")
    if count is not None:
        _check_count(config, count_name)


def _layer_count(config: ISTConfig, fraction_name: str, count_name: str, default: float, num_layers: int) -> int:
    count = getattr(config, count_name)
    if count is not None:
        if count > num_layers:
            _fail(count_name, count, f"the model has only N_L={num_layers} adapter layers; use at most {num_layers}")
        return count
    fraction = getattr(config, fraction_name)
    fraction = default if fraction is None else fraction
    # Round half up (0.25 * 30 = 7.5 -> 8), then keep within [1, N_L].
    return min(num_layers, max(1, math.floor(fraction * num_layers + 0.5)))
