"""The framework-free core of IST: policy (eq. 6-7, 9-10), layer discovery, suppression (eq. 8), controller."""

from istune.core.layers import AdapterLayer, find_adapter_layers, prepare_full_layer_tuning
from istune.core.probe import ProbeSampler
from istune.core.suppress import prepare_suppression, suppress_adapters, suppress_layers
from istune.core.tuner import SparseTuner

__all__ = [
    "AdapterLayer",
    "ProbeSampler",
    "SparseTuner",
    "find_adapter_layers",
    "prepare_full_layer_tuning",
    "prepare_suppression",
    "suppress_adapters",
    "suppress_layers",
]
