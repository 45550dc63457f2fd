"""Moved to :mod:`istune.adapters.methods`; these names stay only for bench until it is rewired."""

from istune.adapters.methods import AdapterArgs  # noqa: F401  shim for bench, removed at merge
from istune.adapters.methods import add_adapters  # noqa: F401  shim for bench, removed at merge
from istune.adapters.methods import load_adapters  # noqa: F401  shim for bench, removed at merge
