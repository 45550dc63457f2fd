"""LLM-Adapters' wording of the eight commonsense tasks, as pure functions.

Each item becomes one instruction that lists the options and ends with an
answer-format line, and the output ``the correct answer is <word>``::

    Please choose the correct solution to the question: <goal>

    Solution1: <sol1>

    Solution2: <sol2>

    Answer format: solution1/solution2

The separators differ per task exactly as in LLM-Adapters' data: PIQA puts
a blank line between options, the others a space; WinoGrande has no blank
line before ``Answer format``; BoolQ lists no options (true/false). ARC
items with 3 or 5 options get ``answer1/answer2/answer3`` or
``answer1/.../answer5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)

_CHOOSE_ANSWER = "Please choose the correct answer to the question: "
# task -> (instruction lead, option word, separator between options, separator before "Answer format")
_LAYOUT = {
    "boolq": ("Please answer the following question with true or false, question: ", "", "", "\n\n"),
    "piqa": ("Please choose the correct solution to the question: ", "Solution", "\n\n", "\n\n"),
    "social_i_qa": (_CHOOSE_ANSWER, "Answer", " ", "\n\n"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: ", "Ending", " ", "\n\n"),
    "winogrande": (
        "Please choose the correct answer to fill in the blank to complete the given sentence: ",
        "Option",
        " ",
        " ",
    ),
    "ARC-Challenge": (_CHOOSE_ANSWER, "Answer", " ", "\n\n"),
    "ARC-Easy": (_CHOOSE_ANSWER, "Answer", " ", "\n\n"),
    "openbookqa": (_CHOOSE_ANSWER, "Answer", " ", "\n\n"),
}
_ALIASES = {"siqa": "social_i_qa", "obqa": "openbookqa", "arc_e": "ARC-Easy", "arc_c": "ARC-Challenge"}


def canonical_task(task: str) -> str:
    """The LLM-Adapters name of a commonsense task (``"arc_easy"`` -> ``"ARC-Easy"``).

    Raises:
        ValueError: If ``task`` is not one of the eight tasks.
    """
    key = task.strip().lower().replace("-", "_")
    names = {name.lower().replace("-", "_"): name for name in COMMONSENSE_TASKS}
    name = names.get(key) or _ALIASES.get(key)
    if name is None:
        raise ValueError(f"task={task!r} is not a commonsense task; use one of {', '.join(COMMONSENSE_TASKS)}")
    return name


def answer_words(task: str, num_options: int) -> list[str]:
    """The answer words of ``task`` (``["solution1", "solution2"]``, ``["true", "false"]``)."""
    word = _LAYOUT[canonical_task(task)][1]
    return [f"{word.lower()}{i}" for i in range(1, num_options + 1)] if word else ["true", "false"]


def format_item(task: str, question: str, options: Sequence[str], label: int) -> dict[str, Any]:
    """One LLM-Adapters row for a multiple-choice item.

    Args:
        task: One of ``COMMONSENSE_TASKS``.
        question: The item's text before the options (BoolQ: the question
            with its ``?``; HellaSwag: ``"<activity>: <context>"``).
        options: The option texts (BoolQ: its two answers, only counted).
        label: Index of the correct option.

    Returns:
        ``{"instruction", "input", "output", "answer"}``.

    Raises:
        ValueError: If ``label`` is not an index into ``options``.
    """
    name = canonical_task(task)
    lead, word, between, before_format = _LAYOUT[name]
    words = answer_words(name, len(options))
    if not 0 <= label < len(words):
        raise ValueError(f"label={label} is not an index into the {len(words)} options of a {name} item")
    text = lead + question
    if word:
        text += "\n\n" + between.join(f"{word}{i}: {option}" for i, option in enumerate(options, start=1))
    text += f"{before_format}Answer format: {'/'.join(words)}"
    return {"instruction": text, "input": "", "output": f"the correct answer is {words[label]}",
            "answer": words[label]}


def split_mc_query(query: str, num_options: int) -> tuple[str, list[str]]:
    """Stem and option texts of an OLMES multiple-choice query.

    The query reads ``"<stem>\\n A. <opt>\\n B. <opt>...\\nAnswer:"``; options
    are split off from the end, so a stem may hold newlines.

    Raises:
        ValueError: If the query does not have that shape.
    """
    if not query.endswith("\nAnswer:"):
        raise ValueError(f"query does not end with '\\nAnswer:': {query[-80:]!r}")
    body, options = query[: -len("\nAnswer:")], []
    for letter in reversed("ABCDEFGH"[:num_options]):
        marker = f"\n {letter}. "
        cut = body.rfind(marker)
        if cut < 0:
            raise ValueError(f"query has no option {letter!r} of {num_options}: {query[:120]!r}")
        options.append(body[cut + len(marker) :])
        body = body[:cut]
    return body, options[::-1]
