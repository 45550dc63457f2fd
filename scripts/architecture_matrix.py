"""Run the architecture matrix (tests/matrix/architectures.py) and write its table into docs/models.md.

    PYTHONPATH=src .venv/bin/python scripts/architecture_matrix.py [--jobs 2] [--types llama mixtral ...] [--no-write]

The table goes between the markers ``<!-- matrix -->`` and ``<!-- /matrix -->`` of docs/models.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "models.md"
START, END = "<!-- matrix -->", "<!-- /matrix -->"


def _run(model_type):
    import warnings

    warnings.filterwarnings("ignore")
    from tests.matrix.architectures import run

    return run(model_type)


def table(results, versions: str) -> str:
    counts = Counter(r.status for r in results)
    buildable = counts["pass"] + counts["fail"]
    lines = [f"{len(results)} model types ({versions}): {buildable} buildable, {counts['pass']} pass, "
             f"{counts['fail']} fail, {counts['not buildable']} not buildable.", "",
             "| type | layers found | result |", "|---|---|---|"]
    for r in results:
        result = r.status if r.status == "pass" else f"{r.status}: {r.reason}"
        lines.append(f"| {r.type} | {r.layers if r.layers is not None else '-'} | {result.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--types", nargs="*")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import peft
    import transformers
    from tests.matrix.architectures import TYPES

    started = time.perf_counter()
    with get_context("spawn").Pool(args.jobs, maxtasksperchild=40) as pool:
        results = []
        for result in pool.imap(_run, args.types or TYPES):
            results.append(result)
            print(f"{result.type:32s} {result.status:14s} {result.seconds:5.1f}s {result.reason}", flush=True)
    print(f"{len(results)} types in {time.perf_counter() - started:.0f} s")
    text = table(results, f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(text.splitlines()[0])
    if not args.no_write and not args.types:
        docs = DOCS.read_text()
        head, rest = docs.split(START)
        DOCS.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END)[1]}")


if __name__ == "__main__":
    main()
