"""Moved to :mod:`istune.models`; these names stay only for bench until it is rewired."""

from istune.models import MODEL_ALIASES as _ALIASES  # noqa: F401  shim for bench, removed at merge
from istune.models import load_model_and_tokenizer  # noqa: F401  shim for bench, removed at merge
from istune.models import smollm2_cache_dir  # noqa: F401  shim for bench, removed at merge
