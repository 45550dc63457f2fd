"""ISTConfig: the hyperparameters of Importance-aware Sparse Tuning.

Defaults are the paper's (Table 8 and the method section). Values that can be checked
without a model are checked at construction; values that depend on the model (N_u > N_L,
a fixed layer index out of range) are checked by :meth:`ISTConfig.resolve` when training
starts, before any step.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

from istune import rule_catalog
from istune.option_checks import did_you_mean

OPTIMIZER_STATE_POLICIES = ("keep", "offload", "drop")
REWARD_SCALES = ("paper", "spread")
TOWER_CHOICES = ("train", "select")


@dataclass(init=False)
class ISTConfig:
    """Configuration of the sparse-tuning controller.

    Example:
        >>> ISTConfig()                        # the paper: 25% of layers per step, IST policy
        >>> ISTConfig(strategy="random")       # random sparse tuning baseline
        >>> ISTConfig(strategy="fixed", layers=[0, 5, 11])
        >>> ISTConfig(strategy="lisa", update_layers=2, switch_interval=50)   # LISA (Pan et al. 2024)

    A rule's parameters (``switch_interval``, ``block_order``, ...) are declared by the rule, not here; they are
    given and read by name as if they were fields, and kept in ``rule_options``.
    """

    strategy: str = field(
        default="ist",
        metadata={"aliases": ["--rule"], "help": "The selection rule (also --rule; ISTConfig(rule=...)), how the "
                  "layers trained each step are chosen: 'ist' (importance-aware, "
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
    towers: str = field(
        default="train",
        metadata={"help": "A multimodal model's vision (or audio) tower: 'train' (default): its adapters train at "
                  "every step, outside the selection, and N_L counts the language model's layers only; 'select': "
                  "its blocks that hold adapters join the layers the rule chooses from, before the language model's "
                  "(data-flow order: positions 0..V-1 the tower's blocks, V..N_L-1 the language layers), so "
                  "`layers`, BAdam's order and N_u's fraction count them too. A model without a tower is refused "
                  "with 'select'. See docs/models.md."},
    )
    probe_batch_size: int | None = field(
        default=None, metadata={"help": "Examples in the probe batch; default: the training batch size per device."}
    )
    rule_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "The selection rule's own parameters by name, each declared in the rule's module "
                  "(istune.rule_catalog; `istune train --help` lists them). Give each as a keyword of its own, "
                  "ISTConfig(strategy='badam', block_order='descending'), or here; those not given take the rule's "
                  "defaults. Read back as attributes: config.block_order."},
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

    def __init__(self, **options: Any) -> None:
        if "rule" in options:  # the selection rule by its other name
            rule = options.pop("rule")
            if options.get("strategy", rule) != rule:
                _fail("strategy", options["strategy"], f"rule={rule!r} names the selection rule too; give one of them")
            options["strategy"] = rule
        rule_options = dict(options.pop("rule_options", None) or {})
        for option in fields(self):
            if option.name != "rule_options":
                default = option.default_factory() if option.default_factory is not MISSING else option.default
                setattr(self, option.name, options.pop(option.name, default))
        self.rule_options = {**rule_options, **options}  # what is left: rule parameters by their own names
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        # A rule parameter read by its name: the value given, else its declared default (for any rule's).
        parameter = rule_catalog.parameter(name) if name != "rule_options" else None
        if parameter is None:
            raise AttributeError(f"'ISTConfig' object has no attribute {name!r}")
        return self.__dict__.get("rule_options", {}).get(name, parameter.default)

    def __post_init__(self) -> None:
        rule = rule_catalog.traits(self.strategy) if isinstance(self.strategy, str) else None
        if rule is None:
            _fail("strategy", self.strategy, f"use one of {', '.join(repr(s) for s in strategy_names())}, or "
                  "register a rule with istune.core.selection.register_rule(name, factory) before building the config")
        self._check_rule_options(rule)
        _check_pair(self, "update_fraction", "update_layers")
        _check_pair(self, "probe_fraction", "probe_layers")
        for name in ("num_probes", "probe_interval"):
            _check_count(self, name)
        if rule.runs_importance_probes and self.num_probes == 1:
            _fail("num_probes", 1, "with one candidate eq. 9's reward exp(-L) - mean(exp(-L)) is always 0 and the "
                  "importance never moves; use N_c >= 2 (the paper: 3)")
        if self.probe_batch_size is not None:
            _check_count(self, "probe_batch_size")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            _fail("beta", self.beta, "β must be a number in [0, 1]; the paper uses 0.25")
        if not is_finite_number(self.mu) or self.mu <= 0:
            _fail("mu", self.mu, "μ must be a finite number > 0; the paper uses 10 (commonsense) or 100 (math)")
        if self.reward_scale not in REWARD_SCALES:
            _fail("reward_scale", self.reward_scale, f"use one of {', '.join(repr(s) for s in REWARD_SCALES)}")
        if self.towers not in TOWER_CHOICES:
            _fail("towers", self.towers, f"use one of {', '.join(repr(t) for t in TOWER_CHOICES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "use an integer")
        if not isinstance(self.recompute_unselected, bool):
            _fail("recompute_unselected", self.recompute_unselected, "use true or false")
        if self.recompute_unselected and rule.trains_all_layers:
            _fail("recompute_unselected", True, f"strategy {self.strategy!r} trains every layer, so no layer is "
                  "unselected; use the model's gradient checkpointing instead, or a sparse strategy")
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
        if rule.trains_given_layers:
            if not self.layers:
                _fail("layers", self.layers, f"strategy {self.strategy!r} needs a non-empty list of layer "
                      "positions, e.g. [0, 5]")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                _fail("layers", self.layers, "layer positions are integers >= 0")
            if len(set(self.layers)) != len(self.layers):
                _fail("layers", self.layers, "remove the repeated positions")
            if self.update_fraction is not None or self.update_layers is not None:
                _fail("update_layers", self.update_layers or self.update_fraction,
                      f"strategy {self.strategy!r} trains exactly `layers`; leave update_layers/update_fraction unset")
        elif self.layers is not None:
            fixed = [name for name in strategy_names() if rule_catalog.traits(name).trains_given_layers]
            _fail("layers", self.layers, f"`layers` only applies to strategy {' or '.join(map(repr, fixed))}, not "
                  f"{self.strategy!r}; remove it")

    def _check_rule_options(self, rule: rule_catalog.RuleTraits) -> None:
        """Each rule parameter given: known, in range, and one the rule takes. Then ``rule_options`` holds
        exactly the rule's parameters, the defaults filled in (so equal settings compare equal)."""
        if not isinstance(self.rule_options, dict):
            _fail("rule_options", self.rule_options, "use a mapping of the rule's parameters by name")
        declared = rule_catalog.parameters()
        given = {}
        for name, value in self.rule_options.items():
            parameter = declared.get(name)
            if parameter is None:
                known = [*(f.name for f in fields(self) if f.name != "rule_options"), *declared]
                takes, hint = ", ".join(rule.parameter_names()) or "none", did_you_mean(name, known)
                raise TypeError(f"ISTConfig got an unknown option {name!r}: {hint}it is neither a field nor a "
                                f"registered rule's parameter (strategy {self.strategy!r} takes: {takes}).")
            if name not in rule.parameter_names():
                if value == parameter.default:
                    continue  # a whole saved config names every rule's parameters, at their defaults
                rules = " or ".join(map(repr, rule_catalog.rules_taking(name)))
                _fail(name, value, f"`{name}` only applies to strategy {rules}, not {self.strategy!r}; remove it")
            fix = parameter.problem(value)
            if fix is not None:
                _fail(name, value, fix)
            given[name] = value
        self.rule_options = {parameter.name: given.get(parameter.name, parameter.default)
                             for parameter in rule.parameters}

    def resolve(self, num_layers: int) -> ResolvedCounts:
        """Turn fractions into layer counts for a model with ``num_layers`` adapter layers (N_L).

        Raises:
            ValueError: when a count exceeds N_L or a fixed layer is out of range.
        """
        rule = rule_catalog.traits(self.strategy)
        if rule.trains_given_layers:
            out_of_range = [i for i in self.layers if i >= num_layers]
            if out_of_range:
                _fail("layers", self.layers,
                      f"positions {out_of_range} are out of range: the model has N_L={num_layers} adapter layers "
                      f"(0..{num_layers - 1})")
            update = len(self.layers)
        elif rule.trains_all_layers:
            update = num_layers
        else:
            update = _layer_count(self, "update_fraction", "update_layers", 0.25, num_layers)
        probe = _layer_count(self, "probe_fraction", "probe_layers", 0.5, num_layers)
        return ResolvedCounts(num_layers=num_layers, update_layers=update, probe_layers=probe)

    def to_dict(self) -> dict:
        """Every option by name, flat: the fields, and in ``rule_options``' place every registered rule's
        parameters (this rule's values, the others' defaults), as ``ISTConfig(**values)`` takes them back."""
        values = {}
        for option in fields(self):
            if option.name == "rule_options":
                values.update({name: getattr(self, name) for name in rule_catalog.parameters()})
            else:
                values[option.name] = getattr(self, option.name)
        return values


@dataclass(frozen=True)
class ResolvedCounts:
    """Layer counts for one model: N_L, N_u and N_v."""

    num_layers: int
    update_layers: int
    probe_layers: int


def strategy_names() -> list[str]:
    """The names ``ISTConfig.strategy`` accepts: the registered rules (the built-in ones register when
    istune is imported), sorted."""
    return rule_catalog.rule_names()


def options_dataclass() -> type:
    """A dataclass of every option by name, for parsers that read dataclasses (HfArgumentParser): ISTConfig's
    fields, and one field per registered rule's parameter, None when not given (the rule's default then).
    Its ``to_config()`` builds the ISTConfig."""
    parameters = rule_catalog.parameters()
    specs = [(option.name, option.type, field(default=option.default, metadata=option.metadata))
             for option in fields(ISTConfig) if option.name != "rule_options"]
    specs += [(name, f"{parameter.kind.__name__} | None",
               field(default=None, metadata={"help": rule_catalog.help_text(parameter),
                                             **({"choices": list(parameter.choices)} if parameter.choices else {})}))
              for name, parameter in parameters.items()]

    def to_config(self) -> ISTConfig:
        values = {name: value for name, value in vars(self).items() if value is not None or name not in parameters}
        return ISTConfig(**values)

    # __module__ so that the string annotations resolve here, as they do for ISTConfig's own.
    return make_dataclass("ISTOptions", specs, namespace={"to_config": to_config, "__module__": __name__})


def option_names() -> list[str]:
    """Every option ISTConfig takes by name: its fields (``rule_options`` aside) and every registered rule's
    parameters. The command line, YAML, and the axolotl and LLaMA-Factory keys are these names."""
    return list(ISTConfig().to_dict())


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
