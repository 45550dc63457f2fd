"""The one record writer of the benchmarks: ``OUT.json``, ``OUT.md`` and optionally ``OUT.png``, each whole.

    meta = run_metadata("-m istune bench time", argv)
    write_record(Path("benchmarks/results/step_time"), {**meta, "rows": rows}, markdown)

Built on :mod:`istune.io` (unique temporary name, fsync, rename, cleanup on failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from istune import io
from istune.io import git_commit, write_text  # noqa: F401  git_commit: part of this module's interface

__all__ = ["REPO", "git_commit", "run_metadata", "write_record"]

REPO = Path(__file__).resolve().parents[3]  # the repository root, whose commit a record names

def run_metadata(script: str, argv: list[str], repo: Path = REPO) -> dict[str, Any]:
    """Command, date, commit, machine and library versions (:func:`istune.io.run_metadata`), this repository's."""
    return io.run_metadata(script, argv, repo)


def write_record(out: Path, data: Any, markdown: Optional[str], figure=None, indent: int = 2) -> list[Path]:
    """Write ``out`` with the suffixes ``.json`` (``data``), ``.png`` (a matplotlib ``figure``, closed after) and
    ``.md`` (``markdown``); return the paths written. Any suffix of ``out`` is replaced."""
    out = Path(out)
    written = [io.write_json(out.with_suffix(".json"), data, indent=indent)]
    if figure is not None:
        import matplotlib.pyplot as plt

        with io.atomic_file(out.with_suffix(".png")) as tmp:
            figure.savefig(tmp, dpi=120)
        plt.close(figure)
        written.append(out.with_suffix(".png"))
    if markdown is not None:
        written.append(write_text(out.with_suffix(".md"), markdown))
    return written
