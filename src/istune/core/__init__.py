"""The framework-free core of IST: policy (eq. 6-7, 9-10), layer discovery, suppression (eq. 8), controller."""

from istune.core.layers import AdapterLayer, find_adapter_layers
from istune.core.probe import ProbeSampler
from istune.core.suppress import suppress_adapters
from istune.core.tuner import SparseTuner

__all__ = ["AdapterLayer", "ProbeSampler", "SparseTuner", "find_adapter_layers", "suppress_adapters"]
