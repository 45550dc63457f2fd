"""Evaluation with a cache: the held-out loss and per-task accuracy as ``istune train`` records them.

``evaluate_model`` is the one evaluation of a run: ``istune train`` calls it for the tuned model
(without a cache) and, through ``evaluate_base``, for the untuned model (with the cache of
:mod:`istune.eval.result_cache`, so a repeated run does not recompute it); ``istune eval``
calls it on a saved run. ``evaluate_parts`` is the per-(method, task) part both build on.

Example::

    result = evaluate_model(model, tokenizer, items, heldout, collate, "both", batch_size=8)
    # {"heldout_loss": 1.9, "generate": {"tasks": {"piqa": 0.6}, "average": 0.6}, "score": {...}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from istune.eval.tasks import method_list


def evaluate_parts(model, tokenizer, items: dict[str, list[dict]], methods: Sequence[str], batch_size: int,
                   cache=None, progress: bool = True, generation_batch_size: int | None = None,
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {task: summary}}`` for each method and task; parts found in ``cache`` are not recomputed.

    ``batch_size`` sequences per scoring pass, ``generation_batch_size`` (default the same)
    prompts per ``generate`` call.

    An exact-match task (``task:...``) has no options to score: only ``"generate"`` evaluates it.

    A summary is ``TaskResult.summary()``: accuracy, correct, total and, for scoring,
    ``accuracy_per_token`` and ``accuracy_per_char``. The settings are those of
    ``istune.eval.evaluate_tasks`` (default prompt, per-task generation budget,
    greedy decoding, a space between context and option), so the numbers are the same.
    """
    from istune.eval.answers import is_exact_task
    from istune.eval.generation import check_generation_items, evaluate_generation
    from istune.eval.result_cache import digest
    from istune.eval.scoring import check_scoring_items, evaluate_scoring

    for task, rows in items.items():  # every item checked before the first (slow) forward pass
        if "generate" in methods:
            check_generation_items(rows, task)
        if "score" in methods and not is_exact_task(task):
            check_scoring_items(rows, task)
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        scored = {task: rows for task, rows in items.items() if method == "generate" or not is_exact_task(task)}
        if not scored:
            continue
        parts[method] = {}
        for task, rows in scored.items():
            part = {"method": method, "task": task, "items": digest(rows)}
            part.update({"max_new_tokens": None, "num_beams": 1} if method == "generate" else {"delimiter": " "})
            stored = cache.get(part) if cache is not None else None
            if stored is None:
                if method == "generate":
                    result = evaluate_generation(model, tokenizer, rows, task,
                                                 batch_size=generation_batch_size or batch_size, progress=progress)
                else:
                    result = evaluate_scoring(model, tokenizer, rows, task, batch_size=batch_size, progress=progress)
                stored = result.to_dict()
                if cache is not None:
                    cache.put(part, stored)
            parts[method][task] = {"accuracy": stored["accuracy"], "correct": stored["correct"],
                                   "total": stored["total"], **stored["metrics"]}
    return parts


def evaluate_model(model, tokenizer, items: dict[str, list[dict]], heldout, collate, method: str, batch_size: int,
                   cache=None, generation_batch_size: int | None = None) -> dict[str, Any]:
    """Held-out loss (when ``heldout`` is given) and accuracy per task and method, as ``istune train`` records them:
    ``{"heldout_loss": x, "<method>": {"tasks": {task: accuracy}, "average": mean}}``."""
    from istune.eval.loss import heldout_loss
    from istune.eval.result_cache import digest

    result: dict[str, Any] = {}
    if heldout is not None:
        part = {"heldout_loss": digest([heldout[i] for i in range(len(heldout))])}
        loss = cache.get(part) if cache is not None else None
        if loss is None:
            loss = heldout_loss(model, heldout, collate, batch_size)
            if cache is not None:
                cache.put(part, loss)
        result["heldout_loss"] = loss
    if items:
        parts = evaluate_parts(model, tokenizer, items, method_list(method), batch_size, cache,
                               generation_batch_size=generation_batch_size)
        for method_name, tasks in parts.items():
            accuracies = {task: summary["accuracy"] for task, summary in tasks.items()}
            result[method_name] = {"tasks": accuracies, "average": sum(accuracies.values()) / len(accuracies)}
    return result


def evaluate_base(model, tokenizer, items: dict[str, list[dict]], heldout, collate, *, method: str, batch_size: int,
                  model_name: str, use_cache: bool = True,
                  generation_batch_size: int | None = None) -> dict[str, Any]:
    """``evaluate_model`` for the untuned model of ``istune train``, from the cache where it can be.

    The cache is keyed by the model's files and load settings, the items, the method and
    istune's evaluation code (see ``istune.eval.result_cache``); a repeated run finds it.
    """
    from istune.eval.result_cache import ResultCache

    cache = ResultCache.for_model(model, model_name) if use_cache else None
    if cache is None:
        why = "" if not use_cache else f" (no cache: {model_name!r} has no local files)"
        print("istune: evaluating the base model" + why)
    else:
        print(f"istune: evaluating the base model (cached results in {cache.root})")
    result = evaluate_model(model, tokenizer, items, heldout, collate, method, batch_size, cache,
                            generation_batch_size)
    if cache is not None:
        print(f"istune: base model: {cache.hits} of {cache.hits + cache.misses} parts from the cache")
    return result
