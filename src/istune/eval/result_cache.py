"""A cache of evaluation results, so the untuned model is evaluated once per (model, items, method).

Every run of ``istune train`` evaluates the base model before the adapters go in,
on the same seeded items; that half of the evaluation is the same every time.
``ResultCache`` keeps each part of such an evaluation (the held-out loss, and one
task under one method) in ``<cache_root()>/eval/<key>.json`` (``$ISTUNE_EVAL_CACHE``
replaces the folder) and hands it back
when the key matches. The key is a SHA-256 over

* the model's identity: its resolved folder and, per file, name, size and
  modification time, the SHA-256 of every small file (config, tokenizer) and of
  each safetensors header (names, shapes, dtypes and offsets of all tensors);
* how it was loaded: parameter dtype, device type, attention implementation,
  quantization config;
* the part: method, task, the SHA-256 of the exact items (or held-out token ids),
  and the settings that change results (generation budget and beams, the
  scoring delimiter); the batch size is left out, as results do not depend on it
  beyond float rounding;
* the code: ``CACHE_VERSION`` and the SHA-256 of the source of the modules that
  compute results (prompt, generation, answer extraction, scoring, loss), so an
  edit to any of them starts a new cache.

A model that is not a local folder (or a hub snapshot already on disk) gets no
cache: ``ResultCache.for_model`` returns None and everything is computed.
Entries are written whole or not at all (``istune.io.write_json``); an unreadable
entry counts as a miss.

Example::

    cache = ResultCache.for_model(model, "smollm2-135m")
    part = {"method": "score", "task": "piqa", "items": digest(items)}
    result = cache.get(part)
    if result is None:
        result = compute()
        cache.put(part, result)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
from pathlib import Path
from typing import Any

CACHE_VERSION = 1  # bump when the meaning of a cached entry changes
EVAL_CACHE_ENV = "ISTUNE_EVAL_CACHE"  # replaces <cache_root()>/eval (the tests point it at a temporary folder)
# Modules whose code decides a result; their source is part of every key.
RESULT_MODULES = (
    "istune.eval.prompt",
    "istune.eval.generation",
    "istune.eval.answers",
    "istune.eval.scoring",
    "istune.eval.loss",
    "istune.data.llm_adapters",
)
_SMALL_FILE = 16 * 1024 * 1024  # files below this size are hashed whole (configs, tokenizers)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys), e.g. of a list of eval items."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _safetensors_header(path: Path) -> str:
    """SHA-256 of a safetensors file's header: every tensor's name, dtype, shape and byte offsets."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return hashlib.sha256(handle.read(min(length, 100 * 1024 * 1024))).hexdigest()


def folder_fingerprint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the model files in ``folder`` without reading the weights.

    Per file (recursively, hidden files skipped): size and ``mtime_ns``; the SHA-256 of
    the content for small non-weight files; the header SHA-256 for safetensors files.
    """
    root = Path(folder).resolve()
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()  # follows hub-cache symlinks to their blobs
        entry: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if path.suffix == ".safetensors":
            entry["header"] = _safetensors_header(path)
        elif stat.st_size < _SMALL_FILE and path.suffix not in _WEIGHT_SUFFIXES:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files[relative.as_posix()] = entry
    return {"folder": str(root), "files": files}


def local_model_folder(name_or_path: str) -> Path | None:
    """The folder holding ``name_or_path``'s files: the folder itself, the embedded model's converted
    folder, or a hub snapshot already in the local Hugging Face cache; None when there is none."""
    from istune.models import resolve_model_path

    resolved = Path(resolve_model_path(name_or_path)).expanduser()
    if resolved.is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: nothing to fingerprint
        return None


def load_settings(model: Any) -> dict[str, Any]:
    """How a loaded model computes: parameter dtype, device type, attention implementation, quantization."""
    parameter = next(model.parameters())
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and hasattr(quantization, "to_dict"):
        quantization = quantization.to_dict()
    return {
        "dtype": str(parameter.dtype),
        "device": parameter.device.type,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "quantization": quantization,
    }


def code_version() -> str:
    """``CACHE_VERSION`` and the SHA-256 of the source of ``RESULT_MODULES``."""
    sources = hashlib.sha256(str(CACHE_VERSION).encode())
    for name in RESULT_MODULES:
        sources.update(Path(importlib.import_module(name).__file__).read_bytes())
    return sources.hexdigest()


class ResultCache:
    """Evaluation parts of one model, stored as ``<root>/<key>.json``.

    Args:
        identity: What makes the model's results what they are (see ``for_model``).
        root: Cache folder; default ``$ISTUNE_EVAL_CACHE``, else ``<cache_root()>/eval``.
    """

    def __init__(self, identity: dict[str, Any], root: str | os.PathLike[str] | None = None):
        from istune.data.cache import cache_root

        self.identity = {**identity, "code": code_version()}
        default = os.environ.get(EVAL_CACHE_ENV) or cache_root() / "eval"
        self.root = Path(root if root is not None else default).expanduser()
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_model(cls, model: Any, name_or_path: str,
                  root: str | os.PathLike[str] | None = None) -> ResultCache | None:
        """The cache of ``model``, loaded from ``name_or_path``; None when its files cannot be found on disk."""
        folder = local_model_folder(name_or_path)
        if folder is None:
            return None
        return cls({"model": folder_fingerprint(folder), "settings": load_settings(model)}, root)

    def path(self, part: dict[str, Any]) -> Path:
        """The file of ``part`` (named by the SHA-256 of identity and part)."""
        return self.root / f"{digest({'identity': self.identity, 'part': part})}.json"

    def get(self, part: dict[str, Any]) -> Any:
        """The cached value of ``part``, or None (a miss) when absent or unreadable."""
        from istune.data.cache import read_json

        stored = read_json(self.path(part))
        if isinstance(stored, dict) and stored.get("part") == json.loads(json.dumps(part)) and "value" in stored:
            self.hits += 1
            return stored["value"]
        self.misses += 1
        return None

    def put(self, part: dict[str, Any], value: Any) -> None:
        """Store ``value`` (anything JSON can hold) for ``part``, atomically."""
        from istune.io import write_json

        write_json(self.path(part), {"part": part, "value": value}, indent=None, ensure_ascii=False)
