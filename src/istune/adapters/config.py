"""BottleneckConfig: what a series or parallel bottleneck adapter looks like and where it goes.

Three kinds (paper, appendix eq. 11 and 13; placements as in LLM-Adapters, Hu et al. 2023):

- ``series``        adapter on a sublayer's output:  h -> h + s * f(h W_down) W_up,  h = base(x)
- ``series_input``  adapter on a sublayer's input:   x -> x + s * f(x W_down) W_up,  then base
- ``parallel``      adapter beside the sublayer:     base(x) + s * f(x W_down) W_up

Example::

    config = BottleneckConfig(kind="parallel", bottleneck_size=256)   # targets: family default
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

KINDS = ("series", "series_input", "parallel")
NON_LINEARITIES = ("tanh", "relu", "gelu", "silu", "identity")
INITS = ("zero_up", "bert")

# Default target modules per model family (``config.model_type``) and adapter kind.
# LLaMA-like MLPs follow the paper's Table 9 (series on the MLP output projection,
# parallel beside up/gate); other families use the same places in their own MLP.
_LLAMA_LIKE = {"series": ["down_proj"], "series_input": ["up_proj", "gate_proj"],
               "parallel": ["up_proj", "gate_proj"]}
_FC = {"series": ["fc2"], "series_input": ["fc1"], "parallel": ["fc1"]}
_DENSE_4H = {"series": ["dense_4h_to_h"], "series_input": ["dense_h_to_4h"],
             "parallel": ["dense_h_to_4h"]}
DEFAULT_TARGET_MODULES: dict[str, dict[str, list[str]]] = {
    **{family: _LLAMA_LIKE for family in (
        "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")},
    "gpt2": {"series": ["mlp.c_proj"], "series_input": ["mlp.c_fc"], "parallel": ["mlp.c_fc"]},
    "opt": _FC,
    "phi": _FC,
    "gpt_neox": _DENSE_4H,
    "bloom": _DENSE_4H,
    "gptj": {"series": ["fc_out"], "series_input": ["fc_in"], "parallel": ["fc_in"]},
}


@dataclass
class BottleneckConfig:
    """Configuration of series / parallel bottleneck adapters.

    Fields are validated on construction; every error names the field, the value
    and what to use instead.
    """

    kind: str = field(
        default="series",
        metadata={"help": "Where the adapter sits: 'series' (on the sublayer's output, eq. 13), "
                          "'series_input' (on its input, before the sublayer) or "
                          "'parallel' (beside it, eq. 11)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Linear (or GPT-2 Conv1D) modules to wrap: a list of name suffixes "
                          "(['down_proj'] matches 'model.layers.0.mlp.down_proj') or one regex "
                          "matched against the full module name. None: the family default "
                          "(DEFAULT_TARGET_MODULES)."},
    )
    bottleneck_size: int = field(
        default=256,
        metadata={"help": "Width r of the bottleneck: W_down is d x r, W_up is r x d "
                          "(paper: 256)."},
    )
    non_linearity: str = field(
        default="tanh",
        metadata={"help": "Activation f between the projections: "
                          "'tanh', 'relu', 'gelu', 'silu' or 'identity'."},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability on the adapter's input, in [0, 1)."},
    )
    scaling: float = field(
        default=1.0,
        metadata={"help": "Scale s multiplying the adapter's output."},
    )
    init: str = field(
        default="zero_up",
        metadata={"help": "'zero_up': W_down as nn.Linear's default, W_up zero, so the adapted "
                          "model starts exactly at the base model. 'bert': both N(0, 0.02), as "
                          "LLM-Adapters did (starts near, not at, the base model)."},
    )

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        _check_choice("init", self.init, INITS)
        if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) \
                or self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size={self.bottleneck_size!r} is invalid: "
                             "use a positive integer such as 256.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is invalid: use a probability in [0, 1).")
        if not math.isfinite(float(self.scaling)):
            raise ValueError(f"scaling={self.scaling!r} is invalid: use a finite number "
                             "such as 1.0.")
        self.dropout, self.scaling = float(self.dropout), float(self.scaling)
        self.target_modules = _check_targets(self.target_modules)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: use one of {', '.join(choices)}.")


def _check_targets(targets: object) -> list[str] | str | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"target_modules={targets!r} is not a valid regex ({err}): "
                             "fix the pattern or pass a list of name suffixes.") from None
        return targets
    names = list(targets) if isinstance(targets, (list, tuple, set, frozenset)) else None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"target_modules={targets!r} is invalid: use a non-empty list of "
                         "module-name suffixes (e.g. ['down_proj']), a regex string, or None "
                         "for the family default.")
    return sorted(names) if isinstance(targets, (set, frozenset)) else names
