"""Which tasks and methods an evaluation runs: ``--eval_tasks`` and ``--eval_method`` read one way everywhere.

    >>> parse_eval_tasks("piqa, PIQA, boolq")     # canonical names, each once
    ['piqa', 'boolq']
    >>> method_list("both")
    ['generate', 'score']
"""

from __future__ import annotations

EVAL_METHODS = ("generate", "score", "both")


def method_list(method: str) -> list[str]:
    """``"both"`` -> ``["generate", "score"]``; one method -> a list of it."""
    if method not in EVAL_METHODS:
        raise ValueError(f"--eval_method={method!r}: use 'generate', 'score' or 'both'.")
    return ["generate", "score"] if method == "both" else [method]


def parse_eval_tasks(text: str) -> list[str]:
    """``'all'``, ``'none'`` or comma-separated task names -> canonical commonsense task names, each once."""
    from istune.data.commonsense_format import COMMONSENSE_TASKS, canonical_task

    name = text.strip().lower()
    if name == "none":
        return []
    if name == "all":
        return list(COMMONSENSE_TASKS)
    try:
        return list(dict.fromkeys(canonical_task(task) for task in text.split(",") if task.strip()))
    except ValueError as error:
        raise ValueError(f"--eval_tasks={text!r}: {error}") from None
