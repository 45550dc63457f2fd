"""Synthetic exact-match tasks: seeded generators for a testbed where fine-tuning moves the metric.

Each task writes short prompts with one right answer, scored by exact match. A small model cannot
answer them untuned and LoRA can learn them in a few hundred steps, so a selection rule's choice of
layers shows in the accuracy (issue 36). ``istune train --data task:NAME`` trains on one::

    istune train --data task:cipher                       # the defaults
    istune train --data task:add:digits=4                 # a parameter, NAME:key=value[:key=value]

A spec is ``task:NAME`` followed by ``:key=value`` for each parameter to change. The rows are
LLM-Adapters rows with their own ``prompt`` (trained and evaluated as ``prompt + output``, without the
Alpaca template, so a step costs a few tokens per example):

    >>> spec = parse_task_spec("task:reverse:length=4")
    >>> rows = training_rows(spec, 2, seed=1)
    >>> rows[0]["prompt"], rows[0]["answer"]          # doctest: +SKIP
    ('reverse: d a h c =', 'c h a d')

Test items come from a generator seeded by the spec alone (``task_test_items``): the same for every run and
seed. Training and held-out rows are drawn with the run's seed and never repeat a test prompt or
each other, so the test items are disjoint from everything a run trains on.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "task:"
TEST_ITEMS = 500  # the fixed test set of every spec; --eval_limit takes its first N


@dataclass(frozen=True)
class TaskParameter:
    """One integer parameter of a task, with its range."""

    name: str
    default: int
    low: int
    high: int
    help: str


@dataclass(frozen=True)
class Task:
    """A generator: ``make(rng, values)`` draws one ``(prompt, answer)`` pair."""

    name: str
    help: str
    parameters: tuple[TaskParameter, ...]
    make: Callable[[random.Random, dict[str, int]], tuple[str, str]]
    check: Callable[[dict[str, int]], str | None] = lambda values: None  # a reason the values cannot work, or None


@dataclass(frozen=True)
class TaskSpec:
    """A task and its parameter values, as ``--data`` spells it (``text``)."""

    task: Task
    values: dict[str, int] = field(hash=False)
    text: str


def _letters(count: int) -> str:
    return string.ascii_lowercase[:count]


def _cipher_table(alphabet: int) -> dict[str, str]:
    """A fixed permutation of the first ``alphabet`` letters with no letter mapped to itself (seeded by its size)."""
    letters = list(_letters(alphabet))
    rng = random.Random(f"cipher-table:{alphabet}")
    while True:
        shuffled = letters[:]
        rng.shuffle(shuffled)
        if all(a != b for a, b in zip(letters, shuffled)):
            return dict(zip(letters, shuffled))


def _cipher(rng: random.Random, v: dict[str, int]) -> tuple[str, str]:
    table = _cipher_table(v["alphabet"])
    word = [rng.choice(_letters(v["alphabet"])) for _ in range(v["length"])]
    return f"cipher: {' '.join(word)} =", " ".join(table[c] for c in word)


def _reverse(rng: random.Random, v: dict[str, int]) -> tuple[str, str]:
    word = [rng.choice(_letters(v["alphabet"])) for _ in range(v["length"])]
    return f"reverse: {' '.join(word)} =", " ".join(reversed(word))


def _sort(rng: random.Random, v: dict[str, int]) -> tuple[str, str]:
    word = [rng.choice(_letters(v["alphabet"])) for _ in range(v["length"])]
    return f"sort: {' '.join(word)} =", " ".join(sorted(word))


def _add(rng: random.Random, v: dict[str, int]) -> tuple[str, str]:
    low, high = 10 ** (v["digits"] - 1) if v["digits"] > 1 else 0, 10 ** v["digits"] - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    return f"{a} + {b} =", str(a + b)


def _count(rng: random.Random, v: dict[str, int]) -> tuple[str, str]:
    letters = _letters(v["alphabet"])
    target = rng.choice(letters)
    word = [rng.choice(letters) for _ in range(v["length"])]
    return f"count {target}: {' '.join(word)} =", str(word.count(target))


def _at_least_ten_thousand(values: dict[str, int], base: str, exponent: str) -> str | None:
    """Refuse a spec whose distinct prompts are too few to hold a test set apart from the training rows."""
    if values[base] ** values[exponent] < 10_000:
        return (f"{base}={values[base]} and {exponent}={values[exponent]} give only "
                f"{values[base] ** values[exponent]} distinct prompts; raise one so there are at least 10,000")
    return None


def _length(default: int, low: int = 2) -> TaskParameter:
    return TaskParameter("length", default, low, 40, "symbols in the input")


def _alphabet(default: int, low: int = 2) -> TaskParameter:
    return TaskParameter("alphabet", default, low, 26, "distinct letters used (the first N of a-z)")


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("cipher", "map each letter through a fixed substitution table of the alphabet",
         (_length(5), _alphabet(10)), _cipher, lambda v: _at_least_ten_thousand(v, "alphabet", "length")),
    Task("reverse", "write the letters in reverse order",
         (_length(6), _alphabet(26)), _reverse, lambda v: _at_least_ten_thousand(v, "alphabet", "length")),
    Task("sort", "write the letters in alphabetical order",
         (_length(6), _alphabet(26)), _sort, lambda v: _at_least_ten_thousand(v, "alphabet", "length")),
    Task("add", "add two numbers of the given digits",
         (TaskParameter("digits", 3, 2, 12, "digits of each summand"),), _add),
    Task("count", "count how often a letter occurs in the letters",
         (_length(12), _alphabet(4)), _count, lambda v: _at_least_ten_thousand(v, "alphabet", "length")),
)}


def is_task_spec(data: str) -> bool:
    """Whether ``--data`` names a synthetic task (``task:NAME...``)."""
    return isinstance(data, str) and data.startswith(PREFIX)


def describe_tasks() -> str:
    """One line per task: its name, what it asks and its parameters with defaults and ranges."""
    lines = []
    for task in TASKS.values():
        params = ", ".join(f"{p.name}={p.default} ({p.low}-{p.high}: {p.help})" for p in task.parameters)
        lines.append(f"  task:{task.name}  {task.help}; {params}")
    return "\n".join(lines)


def parse_task_spec(text: str, option: str = "--data") -> TaskSpec:
    """``task:NAME[:key=value...]`` -> a :class:`TaskSpec`; every error names the value and the fix."""
    if not is_task_spec(text):
        raise ValueError(f"{option}={text!r} is not a task spec; write task:NAME, NAME one of {', '.join(TASKS)}.")
    name, *pairs = text[len(PREFIX):].split(":")
    if name not in TASKS:
        raise ValueError(f"{option}={text!r}: no task {name!r}; the tasks are {', '.join(TASKS)} "
                         "(`istune train --help` describes each).")
    task = TASKS[name]
    values = {p.name: p.default for p in task.parameters}
    known = {p.name: p for p in task.parameters}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if key not in known:
            raise ValueError(f"{option}={text!r}: task {name!r} has no parameter {key!r}; its parameters are "
                             f"{', '.join(known)}.")
        parameter = known[key]
        try:
            value = int(raw) if sep else None
        except ValueError:
            value = None
        if value is None or not parameter.low <= value <= parameter.high:
            raise ValueError(f"{option}={text!r}: {key}={raw!r} must be an integer from {parameter.low} to "
                             f"{parameter.high} ({parameter.help}; default {parameter.default}).")
        values[key] = value
    reason = task.check(values)
    if reason:
        raise ValueError(f"{option}={text!r}: {reason}.")
    return TaskSpec(task, values, text)


def _draw(spec: TaskSpec, count: int, rng: random.Random, exclude: set[str]) -> list[tuple[str, str]]:
    """``count`` pairs with prompts distinct from each other and from ``exclude`` (which grows)."""
    pairs, misses = [], 0
    while len(pairs) < count:
        prompt, answer = spec.task.make(rng, spec.values)
        if prompt not in exclude:
            exclude.add(prompt)
            pairs.append((prompt, answer))
            misses = 0
            continue
        misses += 1
        if misses > 10_000:  # so many repeats in a row: the prompts are (nearly) used up
            raise ValueError(f"--data={spec.text!r} cannot give {count} distinct prompts beside its {TEST_ITEMS} test "
                             "items; lower --train_samples, or raise the task's length or alphabet.")
    return pairs


def _row(prompt: str, answer: str) -> dict[str, str]:
    return {"prompt": prompt, "instruction": prompt, "input": "", "output": " " + answer, "answer": answer}


def task_test_items(spec: TaskSpec) -> list[dict[str, str]]:
    """The spec's fixed test set (:data:`TEST_ITEMS` items, seeded by the spec alone)."""
    pairs = _draw(spec, TEST_ITEMS, random.Random(f"test:{_canonical(spec)}"), set())
    return [_row(prompt, answer) for prompt, answer in pairs]


def training_rows(spec: TaskSpec, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows drawn with ``seed``, none repeating a test prompt or another row's prompt."""
    exclude = {row["prompt"] for row in task_test_items(spec)}
    pairs = _draw(spec, count, random.Random(f"train:{seed}:{_canonical(spec)}"), exclude)
    return [_row(prompt, answer) for prompt, answer in pairs]


def _canonical(spec: TaskSpec) -> str:
    """The spec with every parameter written out, so ``task:add`` and ``task:add:digits=3`` draw alike."""
    return ":".join([spec.task.name, *(f"{k}={spec.values[k]}" for k in sorted(spec.values))])
