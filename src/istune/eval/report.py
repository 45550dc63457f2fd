"""Reports of ``evaluate_tasks`` results: a text table and an atomically written JSON file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from istune.io import write_json as write_json_file


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One block per method: task, items, accuracy in percent, then the average.

    Args:
        results: The output of ``evaluate_tasks``.

    Returns:
        A plain-text table, e.g.::

            method: generate
            task          n   accuracy
            boolq       100      62.00
            piqa        100      71.00
            average              66.50
    """
    blocks = []
    for method, block in results.items():
        names = list(block["tasks"])
        width = max([len("average"), len("task"), *map(len, names)])
        lines = [f"method: {method}", f"{'task':<{width}}  {'n':>6}  {'accuracy':>8}"]
        for name in names:
            summary = block["tasks"][name]
            lines.append(f"{name:<{width}}  {summary['total']:>6}  {100 * summary['accuracy']:>8.2f}")
        lines.append(f"{'average':<{width}}  {'':>6}  {100 * block['average']:>8.2f}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_json(results: dict[str, dict[str, Any]], path: str | os.PathLike, include_records: bool = True) -> Path:
    """Write ``results`` to ``path`` as JSON, atomically.

    Written through :func:`istune.io.write_json`: a reader never sees half a
    file and a crash leaves any previous file intact.

    Args:
        results: The output of ``evaluate_tasks``.
        path: Destination file; missing parent folders are created.
        include_records: Keep the per-item records (large); False keeps summaries only.

    Returns:
        The path written.
    """
    if not include_records:
        results = {method: {k: v for k, v in block.items() if k != "records"} for method, block in results.items()}
    return write_json_file(path, results, indent=2)
