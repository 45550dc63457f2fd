"""Answer extraction: from a model's generated text to a comparable prediction.

Pure functions, no torch. The protocol follows LLM-Adapters
(``commonsense_evaluate.py`` and ``evaluate.py``) so that accuracies stay
comparable with published numbers; every deviation is listed here.

Rules, per task family:

* **Commonsense** (boolq, piqa, social_i_qa, hellaswag, winogrande,
  ARC-Easy, ARC-Challenge, openbookqa): the *first* answer word of the task
  (``true``/``false``, ``solution1``/``solution2``, ...) in the response, as
  LLM-Adapters does. Matching is case-sensitive like LLM-Adapters (the
  training targets are lower case), so ``"Solution1 is wrong, the correct
  answer is solution2"`` gives ``solution2``; pass ``ignore_case=True`` for
  base models that capitalise. Deviation: whole words only, so ``untrue``
  is not ``true`` and ``answer12`` is not ``answer1``; and each task only
  accepts its own labels (social_i_qa stops at ``answer3``).
* **Arithmetic** (gsm8k, svamp, mawps, AddSub, MultiArith, SingleEq): the
  *last* number, after removing thousands commas, as LLM-Adapters does.
  Negatives and decimals are read (``-3``, ``1234.50``); a hyphen between
  two numbers (``10-3``) is a minus operator, not a negative sign. A
  prediction is correct when ``|pred - gold| <= tolerance`` (default
  ``1e-4``; LLM-Adapters used ``1e-3``).
* **Exact match** (the synthetic tasks of ``istune.data.tasks``, named ``task:...``): the first line
  of the stripped response, stripped, must equal the gold answer character for character.
* **AQuA** (options A-E): LLM-Adapters takes the first capital A-E anywhere,
  which the article in "A train leaves..." defeats. Here, in order of
  preference, the *last* match of: an explicit statement (``answer is
  (C)``, ``Answer: C``, ``answer is option C``); a bracketed letter
  (``(C)``, ``C)``); a standalone capital letter, where an ``A`` followed by
  a lower-case word is read as the article unless that word is a verb such
  as ``is``. Only capital letters count.

Deviation for all tasks: the response is cut at the first Alpaca section
header (``### Instruction``, ``### Input``, ``### Response``; two or more
``#``, any case), where a model that did not stop starts inventing the next
example.

Example:
    >>> extract_answer("piqa", "the correct answer is solution2")
    'solution2'
    >>> extract_answer("gsm8k", "She pays $1,234.50 in total.")
    1234.5
"""

from __future__ import annotations

import math
import re

# Answer words per commonsense task (the LLM-Adapters "Answer format" line).
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "arc_easy": tuple(f"answer{i}" for i in range(1, 6)),
    "arc_challenge": tuple(f"answer{i}" for i in range(1, 6)),
    "openbookqa": tuple(f"answer{i}" for i in range(1, 6)),
}
NUMBER_TASKS: frozenset[str] = frozenset({"gsm8k", "svamp", "mawps", "addsub", "multiarith", "singleeq"})
LETTER_TASKS: frozenset[str] = frozenset({"aqua"})
KNOWN_TASKS: tuple[str, ...] = (*COMMONSENSE_LABELS, *sorted(NUMBER_TASKS), *sorted(LETTER_TASKS))

# Other spellings met in the wild, mapped onto the canonical names above.
_ALIASES = {"siqa": "social_i_qa", "obqa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}

DEFAULT_TOLERANCE = 1e-4

_SECTION_HEADER = re.compile(r"#{2,}\s*(?:Instruction|Input|Response)\b", re.IGNORECASE)
# A leading "-" is a sign only when no word character precedes it ("10-3" is 10 minus 3).
_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d+(?:\.\d+)?|(?<!\d)\.\d+)")
# Only the word "answer" ignores case; the letter must be a capital.
_EXPLICIT_LETTER = re.compile(
    r"(?i:answer)\s*(?:(?i:is|was|would\s+be|should\s+be)\s*)?[:=]?\s*(?:(?i:option|choice)\s*)?"
    r"[(\[]?\s*([A-E])(?![A-Za-z0-9])"
)
_BRACKETED_LETTER = re.compile(r"(?:\(([A-E])\)|(?<![A-Za-z0-9(])([A-E])\))")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-E])(?![A-Za-z0-9'])")
_ARTICLE_A = re.compile(r"A\s+(?!(?:is|was|would|will|should|must|can|could|seems|fits|matches)\b)[a-z]")


EXACT_PREFIX = "task:"  # a synthetic task (istune.data.tasks), scored by exact match


def is_exact_task(task: str) -> bool:
    """Whether ``task`` is scored by exact match (a synthetic ``task:...`` spec)."""
    return task.strip().startswith(EXACT_PREFIX)


def normalize_task(task: str) -> str:
    """Canonical task name: lower case, ``-`` as ``_``, known aliases resolved.

    Args:
        task: A task name such as ``"ARC-Easy"``, ``"arc_easy"`` or ``"SVAMP"``.

    Returns:
        The canonical name, one of ``KNOWN_TASKS``, or an exact-match ``task:...`` spec as it is.

    Raises:
        ValueError: If the task is unknown.
    """
    if is_exact_task(task):
        return task.strip()
    name = task.strip().lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    if name not in KNOWN_TASKS:
        raise ValueError(f"task={task!r} is not a known evaluation task; use one of {', '.join(KNOWN_TASKS)}")
    return name


def strip_continuation(text: str) -> str:
    """Cut ``text`` at the first Alpaca section header (``### Instruction`` ...)."""
    match = _SECTION_HEADER.search(text)
    return text[: match.start()] if match else text


def extract_choice(task: str, text: str, ignore_case: bool = False) -> str | None:
    """First answer word of a commonsense task in ``text`` (e.g. ``"solution2"``), or None."""
    name = normalize_task(task)
    if name not in COMMONSENSE_LABELS:
        raise ValueError(f"task={task!r} is not a commonsense task; use extract_answer, which handles every task")
    labels = COMMONSENSE_LABELS[name]
    alternatives = "|".join(sorted(labels, key=len, reverse=True))
    pattern = re.compile(rf"(?<![A-Za-z])({alternatives})(?![A-Za-z0-9])", re.IGNORECASE if ignore_case else 0)
    match = pattern.search(strip_continuation(text))
    return match.group(1).lower() if match else None


def extract_number(text: str) -> float | None:
    """Last number in ``text`` with thousands commas removed, or None."""
    numbers = _NUMBER.findall(strip_continuation(text).replace(",", ""))
    return float(numbers[-1]) if numbers else None


def extract_line(text: str) -> str | None:
    """The first line of ``text`` once stripped (an exact-match task's prediction), or None if there is none."""
    line = strip_continuation(text).strip().split("\n", 1)[0].strip()
    return line or None


def extract_letter(text: str) -> str | None:
    """AQuA option letter (``"A"``-``"E"``) by the preference order in the module docstring, or None."""
    text = strip_continuation(text)
    for pattern in (_EXPLICIT_LETTER, _BRACKETED_LETTER):
        found = [next(g for g in m.groups() if g) for m in pattern.finditer(text)]
        if found:
            return found[-1].upper()
    letters = [m for m in _STANDALONE_LETTER.finditer(text) if not _ARTICLE_A.match(text, m.start())]
    return letters[-1].group(1) if letters else None


def extract_answer(task: str, text: str, ignore_case: bool = False) -> str | float | None:
    """Prediction for ``task`` from generated ``text``; None when nothing is found.

    Args:
        task: Task name (see ``normalize_task``).
        text: The generated response (new tokens only, decoded).
        ignore_case: Commonsense tasks only: also accept ``"True"``, ``"Solution2"``.

    Returns:
        A label word (commonsense), a float (arithmetic), a letter (AQuA), the first line (exact match),
        or None.
    """
    name = normalize_task(task)
    if is_exact_task(name):
        return extract_line(text)
    if name in NUMBER_TASKS:
        return extract_number(text)
    if name in LETTER_TASKS:
        return extract_letter(text)
    return extract_choice(name, text, ignore_case=ignore_case)


def parse_gold_number(answer: str | float | int) -> float:
    """Gold answer of an arithmetic task as a float (``"1,234"`` -> ``1234.0``).

    Raises:
        ValueError: If ``answer`` holds no number.
    """
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    cleaned = str(answer).strip().replace(",", "")
    try:
        return float(cleaned)
    except ValueError:
        value = extract_number(cleaned)
        if value is None:
            raise ValueError(
                f"answer={answer!r} is not a number; arithmetic items need a numeric gold 'answer' such as '42'"
            ) from None
        return value


def is_correct(
    task: str, prediction: str | float | None, answer: str | float | int, tolerance: float = DEFAULT_TOLERANCE
) -> bool:
    """Whether ``prediction`` (from ``extract_answer``) matches the gold ``answer``.

    Args:
        task: Task name.
        prediction: The extracted prediction; None is always wrong.
        answer: The gold answer: label word, number (or numeric string), or letter.
        tolerance: Absolute tolerance for arithmetic tasks.

    Returns:
        True when the prediction matches.
    """
    if prediction is None:
        return False
    name = normalize_task(task)
    if is_exact_task(name):
        return prediction == str(answer).strip()
    if name in NUMBER_TASKS:
        return math.isclose(float(prediction), parse_gold_number(answer), rel_tol=0.0, abs_tol=tolerance)
    gold = str(answer).strip()
    return prediction == (gold.upper() if name in LETTER_TASKS else gold.lower())
