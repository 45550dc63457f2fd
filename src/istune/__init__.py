"""istune: Importance-aware Sparse Tuning for parameter-efficient fine-tuning of LLMs."""

from istune.config import ISTConfig
from istune.core import SparseTuner, find_adapter_layers, suppress_adapters

__version__ = "0.1.0"

__all__ = ["ISTCallback", "ISTConfig", "SparseTuner", "find_adapter_layers", "suppress_adapters"]


def __getattr__(name):
    # The Trainer callback imports transformers; load it only when asked for.
    if name == "ISTCallback":
        from istune.integrations.hf import ISTCallback

        return ISTCallback
    raise AttributeError(f"module 'istune' has no attribute {name!r}")
