"""What each selection rule declares about itself: its parameters, and the traits the config must know.

A rule (a :class:`~istune.core.selection.SelectionRule`) declares its own parameters in its own module,
each a :class:`RuleParameter` with its name, type, range, default, help text and source::

    BLOCK_ORDER = RuleParameter("block_order", "ascending", choices=("ascending", "descending", "random"),
                                help="BAdam's switch_mode: ...", source="Luo et al. 2024")

    class BAdamRule(SelectionRule):
        parameters = (SWITCH_INTERVAL, BLOCK_ORDER)

Registering the rule (:func:`istune.core.selection.register_rule`) enters it here, and everything that
takes options reads this catalogue: :class:`~istune.config.ISTConfig`'s checks, ``istune train``'s flags and
YAML keys, ``istune compare``'s per-arm values, and the axolotl ``ist_*`` and LLaMA-Factory ``ist:`` keys.
A rule of the user's own gets the same as a built-in one. This module imports nothing from istune, so the
config, at the bottom of the package, can read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RuleParameter:
    """One parameter of a selection rule, as ``ISTConfig``, the command line and the YAML keys take it.

    Attributes:
        name: the keyword (``ISTConfig(block_order=...)``, ``--block_order``, ``ist_block_order``).
        default: the value when none is given; its type is the parameter's (int, float, str or bool).
        help: what it does, with the paper's symbol where it has one.
        choices: the allowed strings, for a str parameter.
        low, high: the allowed range of a number (None: unbounded on that side).
        low_open, high_open: whether ``low`` or ``high`` itself is excluded.
        source: where the parameter comes from (a paper or a project).
    """

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    source: str = ""

    @property
    def kind(self) -> type:
        """The value's type: the default's (an int parameter is given as an int, a float one as any number)."""
        return type(self.default)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, as the fix to make; None when it is allowed."""
        kind = self.kind
        if kind is bool:
            return None if isinstance(value, bool) else "use true or false"
        if kind is str:
            if self.choices is not None and value not in self.choices:
                return f"use one of {', '.join(map(repr, self.choices))}"
            return None if isinstance(value, str) else "use a string"
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (kind is int and not isinstance(value, int)):
            return f"use {'an integer' if kind is int else 'a finite number'} {self.range_text()}".rstrip()
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return f"use {'an integer' if kind is int else 'a number'} {self.range_text()}" if too_low or too_high \
            else None

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` naming the parameter, ``value`` and the fix when :meth:`problem` finds one."""
        fix = self.problem(value)
        if fix is not None:
            raise ValueError(f"{self.name}={value!r} is invalid: {fix}.")

    def range_text(self) -> str:
        """The allowed range in words: ``in [0, 1)``, ``>= 1``, ``> 0``, or '' when unbounded."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return ""


@dataclass(frozen=True)
class RuleTraits:
    """What a registered rule is, as far as the config and the front ends must know before it is built.

    Attributes:
        name: the rule's name (``ISTConfig(strategy=...)``).
        parameters: its declared parameters, in order.
        runs_importance_probes: IST's importance loop (eq. 8-10) runs for it, which needs N_c >= 2 candidates.
        trains_all_layers: it trains every layer at every step (N_u = N_L), like plain PEFT.
        trains_given_layers: it trains the positions in ``ISTConfig.layers`` (N_u = their number).
        uses_outlier_ratios: it measures inputs through forward hooks on the linear maps (OwLore).
        uses_probe_batches: it may measure the model on probe batches; False: its choices come from its seed
            (and IST's importance) alone.
    """

    name: str
    parameters: tuple[RuleParameter, ...] = ()
    runs_importance_probes: bool = False
    trains_all_layers: bool = False
    trains_given_layers: bool = False
    uses_outlier_ratios: bool = False
    uses_probe_batches: bool = True

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(parameter.name for parameter in self.parameters)


_RULES: dict[str, RuleTraits] = {}
_PARAMETERS: dict[str, RuleParameter] = {}


def enter(traits: RuleTraits) -> None:
    """Enter a rule in the catalogue (:func:`istune.core.selection.register_rule` calls this).

    Raises:
        ValueError: a parameter shares its name with another rule's but not its declaration (the default,
            range or type differ): one name means one thing in the config, the flags and the YAML keys.
    """
    for parameter in traits.parameters:
        known = _PARAMETERS.get(parameter.name)
        if known is not None and known != parameter:
            raise ValueError(f"rule {traits.name!r} declares a parameter {parameter.name!r} that another rule "
                             "declares differently; reuse that rule's RuleParameter object, or pick another name.")
    for parameter in traits.parameters:
        _PARAMETERS.setdefault(parameter.name, parameter)
    _RULES[traits.name] = traits


def rule_names() -> list[str]:
    """The registered rules' names, sorted."""
    return sorted(_RULES)


def traits(name: str) -> RuleTraits | None:
    """The traits of the rule registered as ``name``; None when there is none."""
    return _RULES.get(name)


def parameter(name: str) -> RuleParameter | None:
    """The parameter any registered rule declares as ``name``; None when none does."""
    return _PARAMETERS.get(name)


def parameters() -> dict[str, RuleParameter]:
    """Every registered rule's parameters by name, in the order the rules declared them."""
    return dict(_PARAMETERS)


def rules_taking(name: str) -> list[str]:
    """The names of the registered rules that declare the parameter ``name``, in registration order."""
    return [rule.name for rule in _RULES.values() if name in rule.parameter_names()]


def help_text(parameter: RuleParameter) -> str:
    """The parameter's help for a flag or a YAML key: its text, the rules that take it, its default."""
    rules = " or ".join(map(repr, rules_taking(parameter.name)))
    source = f" ({parameter.source})" if parameter.source and parameter.source not in parameter.help else ""
    return f"{parameter.help}{source} For strategy {rules}; default {parameter.default!r}."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
