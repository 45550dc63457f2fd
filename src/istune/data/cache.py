"""Where istune keeps what it builds once (data JSON, converted models).

The root is ``~/.cache/istune``; the environment variable ``ISTUNE_CACHE``
replaces it. Data lives under ``<root>/data`` and models under
``<root>/models``. Every file or folder is written through :mod:`istune.io`
(a temporary name in the same folder, then a rename), so a crash never leaves
a half-written cache entry that a later run would trust.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from istune.io import write_json

CACHE_ENV = "ISTUNE_CACHE"


def cache_root() -> Path:
    """The istune cache root: ``$ISTUNE_CACHE`` if set, else ``~/.cache/istune``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "istune"


def data_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder for built data: ``cache_dir`` if given, else ``<cache_root()>/data``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data"


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when the file is absent or unreadable (a stale cache)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def cached_list(
    name: str, expected: int, build: Callable[[], list[Any]], cache_dir: str | os.PathLike[str] | None = None
) -> list[Any]:
    """The list cached in ``<data_cache_dir(cache_dir)>/<name>.json``, built and written if absent.

    A cached file whose length is not ``expected`` counts as stale and is rebuilt.

    Args:
        name: File name without ``.json``; put a format version in it.
        expected: Number of items a good cache holds.
        build: Makes the list when the cache is absent or stale.
        cache_dir: Data cache folder (see ``data_cache_dir``).
    """
    path = data_cache_dir(cache_dir) / f"{name}.json"
    items = read_json(path)
    if isinstance(items, list) and len(items) == expected:
        return items
    items = build()
    write_json(path, items, indent=None, ensure_ascii=False)
    return items
