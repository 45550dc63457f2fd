"""What every benchmark writes beside its table: the commit it measured, and files written whole or not at all."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


def git_commit(repo: Path) -> str:
    """Short commit of ``repo``, with ``+uncommitted changes`` when the tree is dirty; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted changes" if dirty else "")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_metadata(script: str, argv: list[str], repo: Path) -> dict:
    """Command, date, commit, machine and library versions of a benchmark run."""
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
