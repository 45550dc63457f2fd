"""Series and parallel bottleneck adapters (paper eq. 11, 13), injected the peft way.

Example::

    from istune.adapters import BottleneckConfig, add_bottleneck_adapters
    model = add_bottleneck_adapters(model, BottleneckConfig(kind="parallel"))
"""

from .config import DEFAULT_TARGET_MODULES, BottleneckConfig
from .layer import BottleneckLayer
from .model import (
    PAPER_METHODS,
    add_bottleneck_adapters,
    add_paper_bottleneck_adapters,
    bottleneck_layers,
    count_trainable_parameters,
    linear_module_names,
    load_bottleneck_adapters,
    resolve_target_modules,
    save_bottleneck_adapters,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "BottleneckConfig",
    "BottleneckLayer",
    "PAPER_METHODS",
    "add_bottleneck_adapters",
    "add_paper_bottleneck_adapters",
    "bottleneck_layers",
    "count_trainable_parameters",
    "linear_module_names",
    "load_bottleneck_adapters",
    "resolve_target_modules",
    "save_bottleneck_adapters",
]
