"""The one child-process runner: a benchmark function run in a fresh Python process, its record read back.

    record = run_in_child("istune.bench.frontier:memory_run", {"row": "lora", "size": "test"}, timeout=600)

A fresh process has its own allocator, CUDA context and peak counters, so no row inherits
another's; an out-of-memory error or a crash stays in it. The protocol, in full: the child runs
``python -m istune.bench.child MODULE:FUNCTION KWARGS_JSON RESULT_PATH``, calls the function
with the keyword arguments and writes what it returns (JSON) to ``RESULT_PATH``
(:func:`istune.io.write_json`: whole or not at all). A result file means success.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from istune.io import write_json

__all__ = ["ChildFailed", "run_in_child"]

SRC = Path(__file__).resolve().parents[2]  # the folder holding the istune package


class ChildFailed(RuntimeError):
    """The child exited without a result: its last lines of output say why."""


def run_in_child(function: str, kwargs: dict[str, Any], timeout: float | None = None) -> Any:
    """Call ``function`` (``"istune.<module>:<name>"``) with ``kwargs`` (JSON values) in a fresh Python process.

    Raises:
        ChildFailed: the child exited without writing its result (its last output lines in the message).
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (the child is killed).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="istune_child_") as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", "istune.bench.child", function, json.dumps(kwargs), str(result)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not result.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ChildFailed(" | ".join(tail) or f"exit status {done.returncode}")
        return json.loads(result.read_text())


def main(argv: list[str]) -> int:
    function, kwargs, result = argv
    module, _, name = function.partition(":")
    if not module.startswith(("istune.", "tests.")) or not name:
        raise ValueError(f"{function!r}: give istune.<module>:<function> (or a test's tests.<module>:<function>).")
    write_json(result, getattr(importlib.import_module(module), name)(**json.loads(kwargs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
