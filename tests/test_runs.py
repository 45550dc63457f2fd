"""A run's data and evaluation options with a synthetic task: the checks before loading, its rows and its items."""

import pytest

from istune.data import load_eval_items
from istune.data.tasks import parse_task_spec, task_test_items
from istune.runs import RunArgs, check_run, comparison_run_folder, load_rows

TASK = "task:reverse:length=5"


def test_a_task_is_evaluated_on_its_own_test_items():
    assert check_run(RunArgs(data=TASK)) == [TASK]
    assert check_run(RunArgs(data=TASK, eval_tasks="none")) == []
    items = load_eval_items([TASK], 40, seed=7)[TASK]
    assert items == task_test_items(parse_task_spec(TASK))[:40]


def test_a_task_s_training_and_held_out_rows_are_disjoint_and_seeded():
    run = RunArgs(data=TASK, train_samples=300, heldout_samples=20)
    train, heldout = load_rows(run, seed=1)
    assert (len(train), len(heldout)) == (300, 20)
    prompts = [row["prompt"] for row in train + heldout]
    test = {row["prompt"] for row in task_test_items(parse_task_spec(TASK))}
    assert len(set(prompts)) == 320 and not set(prompts) & test
    assert load_rows(run, seed=1) == (train, heldout) and load_rows(run, seed=2)[0] != train


@pytest.mark.parametrize(("options", "message"), [
    ({"data": "task:nope"}, "--data='task:nope': no task 'nope'; the tasks are cipher, reverse, sort, add, count"),
    ({"data": "task:add:digits=0"}, "digits='0' must be an integer from 2 to 12"),
    ({"data": TASK, "train_samples": None}, "has no 'all'; give --train_samples N"),
    ({"data": TASK, "eval_method": "score"}, "no options to score; use --eval_method generate"),
    ({"data": TASK, "eval_tasks": "piqa"}, "a task is evaluated on its own test items; use 'all'"),
    ({"data": TASK, "eval_limit": 501}, "a task has 500 test items; use at most 500"),
    ({"data": TASK, "curve_every": -1}, "--curve_every=-1 must be a number of steps >= 1, or 0"),
    ({"data": "nowhere.json"}, "neither 'commonsense', an existing LLM-Adapters JSON file, nor a task spec"),
])
def test_bad_task_options_are_refused_naming_the_field(options, message):
    with pytest.raises(ValueError) as caught:
        check_run(RunArgs(**options))
    assert message in str(caught.value)


def test_comparison_run_folders_name_arm_and_seed(tmp_path):
    assert comparison_run_folder(tmp_path, "quarter:4", 2) == tmp_path / "runs" / "quarter_4-seed2"
    assert comparison_run_folder(tmp_path, "ist:mu=100", 1) == tmp_path / "runs" / "ist_mu-100-seed1"
