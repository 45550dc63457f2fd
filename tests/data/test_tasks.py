"""The synthetic exact-match tasks: answers checked by another computation, seeding, disjoint splits, errors."""

import string

import pytest

from istune.data.tasks import (
    TASKS,
    TEST_ITEMS,
    _cipher_table,
    is_task_spec,
    parse_task_spec,
    task_test_items,
    training_rows,
)


def _letters(prompt: str) -> list[str]:
    """The symbols between the task word and ``=``."""
    return prompt.split(":", 1)[1].rsplit("=", 1)[0].split()


def _answer_by_hand(prompt: str, values: dict) -> str:
    """Each task's answer computed from its prompt, independently of the generator."""
    if prompt.startswith("cipher:"):
        letters = string.ascii_lowercase[: values["alphabet"]]
        table = _cipher_table(values["alphabet"])
        assert sorted(table.values()) == list(letters) and all(table[c] != c for c in letters)  # a derangement
        return " ".join(table[c] for c in _letters(prompt))
    if prompt.startswith("reverse:"):
        return " ".join(_letters(prompt)[::-1])
    if prompt.startswith("sort:"):
        return " ".join(sorted(_letters(prompt)))
    if prompt.startswith("count "):
        target = prompt.split()[1].rstrip(":")
        return str(_letters(prompt).count(target))
    left, right = prompt.rstrip(" =").split(" + ")
    return str(int(left) + int(right))


@pytest.mark.parametrize("name", TASKS)
def test_every_answer_follows_the_task_rule(name):
    spec = parse_task_spec(f"task:{name}")
    rows = training_rows(spec, 200, seed=3)
    for row in rows + task_test_items(spec)[:50]:
        assert row["answer"] == _answer_by_hand(row["prompt"], spec.values)
        assert row["output"] == " " + row["answer"] and row["instruction"] == row["prompt"]
    if name in ("cipher", "reverse", "sort", "count"):
        assert all(len(_letters(row["prompt"])) == spec.values["length"] for row in rows)
    if name == "add":
        assert all(len(part) == 3 for row in rows for part in row["prompt"].rstrip(" =").split(" + "))


def test_parameters_change_the_items():
    spec = parse_task_spec("task:cipher:length=7:alphabet=12")
    assert spec.values == {"length": 7, "alphabet": 12}
    rows = training_rows(spec, 100, seed=0)
    assert all(len(_letters(r["prompt"])) == 7 for r in rows)
    assert set("".join(_letters(r["prompt"])[0] for r in rows)) <= set(string.ascii_lowercase[:12])
    assert {len(r["prompt"].rstrip(" =").split(" + ")[0]) for r in training_rows(parse_task_spec(
        "task:add:digits=5"), 50, 0)} == {5}


def test_test_items_are_fixed_and_disjoint_from_every_seed_s_training_rows():
    spec = parse_task_spec("task:reverse:length=4:alphabet=10")
    test = task_test_items(spec)
    assert len(test) == TEST_ITEMS and test == task_test_items(parse_task_spec("task:reverse:alphabet=10:length=4"))
    test_prompts = {row["prompt"] for row in test}
    assert len(test_prompts) == TEST_ITEMS
    for seed in (0, 1):
        rows = training_rows(spec, 3000, seed)
        prompts = [row["prompt"] for row in rows]
        assert len(set(prompts)) == len(prompts) and not set(prompts) & test_prompts
    assert training_rows(spec, 50, 0) == training_rows(spec, 50, 0)
    assert training_rows(spec, 50, 0) != training_rows(spec, 50, 1)
    assert training_rows(spec, 80, 0)[:50] == training_rows(spec, 50, 0)  # more rows extend, not reshuffle


def test_defaults_written_out_are_the_same_spec():
    assert task_test_items(parse_task_spec("task:add")) == task_test_items(parse_task_spec("task:add:digits=3"))
    assert task_test_items(parse_task_spec("task:add")) != task_test_items(parse_task_spec("task:add:digits=4"))


@pytest.mark.parametrize(("text", "message"), [
    ("task:nope", "no task 'nope'; the tasks are cipher, reverse, sort, add, count"),
    ("task:add:digits=0", "digits='0' must be an integer from 2 to 12"),
    ("task:add:digits=two", "digits='two' must be an integer from 2 to 12"),
    ("task:add:digits", "digits='' must be an integer from 2 to 12"),
    ("task:add:width=3", "task 'add' has no parameter 'width'; its parameters are digits"),
    ("task:cipher:length=2", "alphabet=10 and length=2 give only 100 distinct prompts"),
    ("cipher", "is not a task spec"),
])
def test_bad_specs_name_the_value_and_the_fix(text, message):
    with pytest.raises(ValueError, match="--data=") as caught:
        parse_task_spec(text)
    assert message in str(caught.value)


def test_too_many_rows_for_a_small_task_is_refused():
    spec = parse_task_spec("task:reverse:length=4:alphabet=10")  # 10,000 prompts, 500 of them test items
    assert len(training_rows(spec, 5_000, 0)) == 5_000
    with pytest.raises(ValueError, match="lower --train_samples"):
        training_rows(spec, 9_600, 0)


def test_is_task_spec():
    assert is_task_spec("task:add") and not is_task_spec("commonsense") and not is_task_spec("data/task.json")
