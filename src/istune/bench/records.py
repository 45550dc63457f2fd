"""The one record writer of the benchmarks: ``OUT.json``, ``OUT.md`` and optionally ``OUT.png``, each whole.

    meta = run_metadata("-m istune bench time", argv)
    write_record(Path("benchmarks/results/step_time"), {**meta, "rows": rows}, markdown_table(head, cells))

Built on :mod:`istune.io` (unique temporary name, fsync, rename, cleanup on failure).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from istune import io
from istune.io import git_commit, write_text  # noqa: F401  git_commit: part of this module's interface

__all__ = ["REPO", "git_commit", "markdown_table", "run_metadata", "write_record"]

REPO = Path(__file__).resolve().parents[3]  # the repository root, whose commit a record names
_RULES = {"l": "---", "r": "---:", "c": ":-:"}


def run_metadata(script: str, argv: list[str], repo: Path = REPO) -> dict[str, Any]:
    """Command, date, commit, machine and library versions (:func:`istune.io.run_metadata`), this repository's."""
    return io.run_metadata(script, argv, repo)


def markdown_table(head: list[str], rows: Iterable[Iterable[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align``: one letter per column, ``l``, ``r`` or ``c`` (default: the first left, the rest
    right)."""
    align = align or "l" + "r" * (len(head) - 1)
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in (head, *rows)]
    return "\n".join([lines[0], "|" + "|".join(_RULES[a] for a in align) + "|", *lines[1:]])


def write_record(out: Path, data: Any, markdown: str | None, figure=None, indent: int = 2) -> list[Path]:
    """Write ``out`` with the suffixes ``.json`` (``data``), ``.png`` (a matplotlib ``figure``, closed after) and
    ``.md`` (``markdown``); return the paths written. Any suffix of ``out`` is replaced."""
    out = Path(out)
    written = [io.write_json(out.with_suffix(".json"), data, indent=indent)]
    if figure is not None:
        written.append(io.save_figure(figure, out.with_suffix(".png"), tight_layout=False))
    if markdown is not None:
        written.append(write_text(out.with_suffix(".md"), markdown))
    return written
