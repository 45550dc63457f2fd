"""evaluate_tasks: run generation and/or option scoring over several tasks.

Results are keyed by method first, so generation and scoring accuracies are
never mixed in one average::

    {
      "generate": {"tasks": {"piqa": {"accuracy": 0.71, "correct": 71, "total": 100}, ...},
                   "average": 0.68,
                   "records": {"piqa": [...], ...}},
      "score":    {...},
    }

``average`` is the unweighted mean of the per-task accuracies (the "Avg."
column of LLM-Adapters-style tables), not the pooled accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from istune.eval.answers import DEFAULT_TOLERANCE
from istune.eval.generation import check_generation_items, evaluate_generation
from istune.eval.result import TaskResult
from istune.eval.scoring import check_scoring_items, evaluate_scoring

METHODS = ("generate", "score")


def _methods(method: str | Sequence[str]) -> tuple[str, ...]:
    methods = (method,) if isinstance(method, str) else tuple(method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"method={method!r} is not valid; use 'generate', 'score' or a list of both")
    return tuple(dict.fromkeys(methods))


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: dict[str, Sequence[dict[str, Any]]],
    method: str | Sequence[str] = "generate",
    limit: int | None = None,
    batch_size: int = 8,
    *,
    generation_batch_size: int | None = None,
    prompt_fn: Callable[[dict[str, Any]], str] | None = None,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    delimiter: str = " ",
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per-task accuracy and their average, for each requested method.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        tasks: Task name to eval items (see ``evaluate_generation`` and
            ``evaluate_scoring`` for the keys each method needs).
        method: ``"generate"``, ``"score"``, or a sequence of both.
        limit: Evaluate only the first ``limit`` items of each task (quick checks).
        batch_size: Prompts (generate) or sequences (score) per forward pass.
        generation_batch_size: Prompts per ``generate`` call, if not ``batch_size``
            (decoding reads every weight once per token for the whole batch, so it
            pays to batch more prompts than scoring does sequences).
        prompt_fn: Item to prompt text for generation; default the training template.
        max_new_tokens: Generation budget; default per task (32 commonsense, 256 math).
        num_beams: 1 for greedy decoding, more for beam search.
        tolerance: Absolute tolerance of numeric answers.
        delimiter: Joins context and option when scoring.
        progress: Show tqdm bars.

    Returns:
        ``{method: {"tasks": {task: summary}, "average": float, "records": {task: [...]}}}``,
        accuracies as fractions in [0, 1].

    Raises:
        ValueError: On an unknown method, a ``limit`` below 1, no tasks, an empty task, or a bad item.
        KeyError: If an item lacks a key its method needs; raised before any evaluation runs.
    """
    methods = _methods(method)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be at least 1, or None for every item")
    if not tasks:
        raise ValueError("tasks is empty; pass a dict of task name to eval items")
    empty = [name for name, items in tasks.items() if not items]
    if empty:
        raise ValueError(f"tasks {empty} have no items; drop them or check the data files")
    selected = {name: list(items)[:limit] for name, items in tasks.items()}
    for name, items in selected.items():  # every item checked before the first (slow) forward pass
        if "generate" in methods:
            check_generation_items(items, name)
        if "score" in methods:
            check_scoring_items(items, name)
    output: dict[str, dict[str, Any]] = {}
    for current in methods:
        results: dict[str, TaskResult] = {}
        for name, items in selected.items():
            if current == "generate":
                results[name] = evaluate_generation(
                    model,
                    tokenizer,
                    items,
                    name,
                    prompt_fn=prompt_fn,
                    batch_size=generation_batch_size or batch_size,
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    tolerance=tolerance,
                    progress=progress,
                )
            else:
                results[name] = evaluate_scoring(
                    model, tokenizer, items, name, batch_size=batch_size, delimiter=delimiter, progress=progress
                )
        output[current] = {
            "tasks": {name: result.summary() for name, result in results.items()},
            "average": sum(r.accuracy for r in results.values()) / len(results),
            "records": {name: result.records for name, result in results.items()},
        }
    return output
