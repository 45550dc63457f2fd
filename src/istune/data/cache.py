"""Where istune keeps what it builds once (data JSON, converted models), and atomic writes.

The root is ``~/.cache/istune``; the environment variable ``ISTUNE_CACHE``
replaces it. Data lives under ``<root>/data`` and models under
``<root>/models``. Every file or folder is written under a temporary name
in the same folder and then renamed, so a crash never leaves a half-written
cache entry that a later run would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

CACHE_ENV = "ISTUNE_CACHE"


def cache_root() -> Path:
    """The istune cache root: ``$ISTUNE_CACHE`` if set, else ``~/.cache/istune``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "istune"


def data_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder for built data: ``cache_dir`` if given, else ``<cache_root()>/data``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename.

    Args:
        path: Destination file; its parent folders are created.
        data: Anything ``json.dump`` takes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    write_json_atomic(path, items)
    return items
