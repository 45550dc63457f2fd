"""istune: Importance-aware Sparse Tuning for parameter-efficient fine-tuning of LLMs."""

from istune.config import ISTConfig
from istune.core import SparseTuner, find_adapter_layers, suppress_adapters

__version__ = "0.1.0"

__all__ = ["ISTCallback", "ISTConfig", "SparseTuner", "add_ist", "find_adapter_layers", "suppress_adapters"]


def __getattr__(name):
    # The Trainer integration imports transformers; load it only when asked for.
    if name in ("ISTCallback", "add_ist"):
        from istune.integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'istune' has no attribute {name!r}")
