"""Files written whole or not at all, and what a run records about itself.

Every file istune writes (results, logs, records, plots, caches, run files)
goes through this module. One rule for all of them:

- the content is written to a temporary name unique to this writer
  (``.<name>.<random>.tmp`` in the destination's folder, so two writers never
  share it), flushed and fsync'ed, then renamed over the destination: a
  reader sees the old file or the new one, never half of one;
- on any failure the temporary file (or folder) is removed and the
  destination is left as it was;
- the result has the usual permissions, ``0o666`` (files) or ``0o777``
  (folders) less the process umask, as ``open`` would have given.

Usage::

    write_text(path, "...")
    write_json(path, {"a": 1}, indent=2)
    with atomic_file(path) as tmp:        # for writers that want a path (savefig, torch.save)
        figure.savefig(tmp)
    with atomic_dir(folder) as tmp:       # a whole folder (save_pretrained)
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsync'ed and renamed onto ``path``.

    The temporary name keeps ``path``'s suffix (``.<name>.<random>.tmp<suffix>``), so writers that
    pick a format from the extension (matplotlib's ``savefig``) still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path`` as a Path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path`` as a Path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """Write ``data`` as JSON (with a final newline when indented) to ``path`` atomically."""
    text = json.dumps(data, indent=indent, **dumps_kwargs)
    return write_text(path, text + "\n" if indent is not None else text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on a clean exit it is renamed onto ``path``.

    Args:
        path: The folder to create.
        replace: Remove an existing ``path`` first (``--overwrite``); without it, an existing
            folder is an error (``FileExistsError``) and is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        mask = _umask()
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
                file.chmod(0o666 & ~mask)  # safetensors and mkstemp make 0600
            elif file.is_dir():
                file.chmod(0o777 & ~mask)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists; pass replace=True to overwrite it.")
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(figure: Any, path: str | os.PathLike[str], tight_layout: bool = True, dpi: int = 120) -> Path:
    """Save a matplotlib ``figure`` as ``path`` (format from the suffix) through :func:`atomic_file`, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            if tight_layout:
                figure.tight_layout()
            figure.savefig(tmp, dpi=dpi)
    finally:
        plt.close(figure)
    return Path(path)


def git_commit(repo: str | os.PathLike[str]) -> str:
    """Short commit of ``repo``, with ``+uncommitted changes`` when the tree is dirty; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted changes" if dirty else "")


def run_metadata(script: str, argv: list[str], repo: str | os.PathLike[str]) -> dict[str, Any]:
    """Command, date, commit, machine and library versions of a run, for the records it writes."""
    import datetime as dt
    import platform

    import peft
    import torch
    import transformers

    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    return {
        "command": " ".join(["PYTHONPATH=src", ".venv/bin/python", script, *argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(repo),
        "machine": machine,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
    }


def repo_relative(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the git repository that holds it, so that a record reads the same on every machine
    (``benchmarks/results/x``, not ``/home/me/istune/benchmarks/results/x``); as given when no repository does."""
    resolved = Path(path).resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / ".git").exists():
            return str(resolved.relative_to(folder)) or "."
    return str(path)
