"""The LLM-Adapters data format and its Alpaca-style prompt template.

A data file is a JSON list, or JSON lines, of rows like::

    {"instruction": "...", "input": "", "output": "the correct answer is true", "answer": "true"}

``input`` and ``answer`` may be absent or empty. Other keys are kept.

The template reproduces LLM-Adapters' ``finetune.py`` ``generate_prompt``
character for character, including what its "formatting disaster" leaves
in the text: every line after the header is indented by 16 spaces, the
blank lines between sections hold those 16 spaces, and the header ends with
one space (with input) or two spaces (without). A model fine-tuned on that
text should be prompted with the same text, so ``generate_prompt`` with the
default ``output=""`` is also the evaluation prompt: exactly the training
text up to where the response starts. ``style="evaluate"`` gives the
slightly different whitespace of LLM-Adapters' ``commonsense_evaluate.py``,
for reproducing their evaluation byte for byte.

Example:
    >>> rows = load_llm_adapters_json("commonsense_170k.json")
    >>> text = generate_prompt(rows[0]["instruction"], rows[0]["input"], rows[0]["output"])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_INDENT = " " * 16
_HEAD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEAD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
STYLES = ("finetune", "evaluate")


def generate_prompt(
    instruction: str,
    input: str | None = None,  # noqa: A002 - LLM-Adapters' name
    output: str = "",
    style: str = "finetune",
) -> str:
    """The LLM-Adapters prompt for one example, followed by ``output``.

    Args:
        instruction: The task instruction.
        input: Optional context; empty or None selects the template without input.
        output: The response; leave empty for the generation prompt.
        style: ``"finetune"`` (LLM-Adapters' training template, the default and
            what istune trains on) or ``"evaluate"`` (their evaluation script's
            whitespace: no spaces on blank lines, one space after the header).

    Returns:
        The prompt text; with ``output=""`` it ends with ``"### Response:\\n"``
        and 16 spaces, where the response starts.

    Raises:
        ValueError: If ``style`` is unknown.
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not a template style; use one of {STYLES}")
    blank = _INDENT if style == "finetune" else ""
    if input:
        head = _HEAD_WITH_INPUT + (" " if style == "finetune" else "")
        sections = [("### Instruction:", instruction), ("### Input:", input)]
    else:
        head = _HEAD_NO_INPUT + ("  " if style == "finetune" else " ")
        sections = [("### Instruction:", instruction)]
    body = f"\n{blank}\n".join(f"{_INDENT}{title}\n{_INDENT}{text}" for title, text in sections)
    return f"{head}\n\n{body}\n{blank}\n{_INDENT}### Response:\n{_INDENT}{output}"


def _check_row(row: Any, path: Path, index: int, require_output: bool) -> dict[str, Any]:
    """One validated row with ``input`` and ``answer`` filled in; ValueError naming the fault."""
    where = f"{path}: row {index}"
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, not an object; each row must be a JSON object")
    required = ("instruction", "output") if require_output else ("instruction",)
    for field in required:
        if field not in row:
            raise ValueError(f"{where} has no {field!r} field (keys: {sorted(row)}); add it")
    for field in ("instruction", "output", "input"):
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r}={value!r} is a {type(value).__name__}; it must be a string")
    if not row["instruction"].strip():
        raise ValueError(f"{where}: field 'instruction' is empty; every row needs an instruction")
    return {**row, "input": row.get("input") or "", "output": row.get("output") or "", "answer": row.get("answer", "")}


def _parse(text: str, path: Path) -> list[Any]:
    """Rows of a JSON list or of JSON lines."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix the file or write one JSON object per line") from e
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e}); fix that line") from e
    return rows


def load_llm_adapters_json(path: str | os.PathLike[str], require_output: bool = True) -> list[dict[str, Any]]:
    """Rows of an LLM-Adapters-format file (a JSON list or JSON lines).

    Args:
        path: The file.
        require_output: Whether every row needs an ``output`` (set False for
            evaluation files that only have ``answer``).

    Returns:
        The rows in file order, each with string ``instruction``, ``input``
        and ``output`` (missing ones as ``""``) and ``answer`` (``""`` if absent).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not JSON, is empty, or a row is malformed;
            the message names the file, the row index and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass the path of an LLM-Adapters JSON file")
    rows = _parse(path.read_text(encoding="utf-8"), path)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: holds no rows; expected a non-empty JSON list or JSON lines of objects")
    return [_check_row(row, path, index, require_output) for index, row in enumerate(rows)]
