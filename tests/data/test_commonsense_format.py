"""LLM-Adapters' commonsense wording, checked against rows of their published test files."""

from __future__ import annotations

import pytest

from istune.data.commonsense_format import (
    COMMONSENSE_TASKS,
    answer_words,
    canonical_task,
    format_item,
    split_mc_query,
)

# (task, question, options, label, expected instruction) -- instructions as in LLM-Adapters' dataset/*/test.json
CASES = [
    (
        "boolq",
        "does ethanol take more energy make that produces?",
        ["yes", "no"],
        1,
        "Please answer the following question with true or false, question: "
        "does ethanol take more energy make that produces?\n\nAnswer format: true/false",
    ),
    (
        "piqa",
        "Retain study notes in brain.",
        ["Go over notes one last time one week before test.", "Go over notes one last time one day before test."],
        1,
        "Please choose the correct solution to the question: Retain study notes in brain.\n\n"
        "Solution1: Go over notes one last time one week before test.\n\n"
        "Solution2: Go over notes one last time one day before test.\n\n"
        "Answer format: solution1/solution2",
    ),
    (
        "social_i_qa",
        "Robin wanted to share the food with a friend, so they cut the sandwich in half. "
        "What does Robin need to do before this?",
        ["get a knife", "eat half of her own sandwich", "give half the sandwich to her friend"],
        0,
        "Please choose the correct answer to the question: Robin wanted to share the food with a friend, so they "
        "cut the sandwich in half. What does Robin need to do before this?\n\n"
        "Answer1: get a knife Answer2: eat half of her own sandwich Answer3: give half the sandwich to her friend\n\n"
        "Answer format: answer1/answer2/answer3",
    ),
    (
        "hellaswag",
        "Playing drums: People are standing behind large drums. A man",
        [
            "is playing a bag pipe.",
            "starts to play around the drums.",
            "begins playing a drum set.",
            "begins playing the drums.",
        ],
        3,
        "Please choose the correct ending to complete the given sentence: Playing drums: People are standing "
        "behind large drums. A man\n\nEnding1: is playing a bag pipe. Ending2: starts to play around the drums. "
        "Ending3: begins playing a drum set. Ending4: begins playing the drums.\n\n"
        "Answer format: ending1/ending2/ending3/ending4",
    ),
    (
        "winogrande",
        "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        ["Sarah", "Maria"],
        1,
        "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much "
        "better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria "
        "Answer format: option1/option2",
    ),
    (
        "ARC-Challenge",
        "Snow, rain, hail, and fog are all forms of",
        ["gas.", "water.", "wind.", "clouds."],
        1,
        "Please choose the correct answer to the question: Snow, rain, hail, and fog are all forms of\n\n"
        "Answer1: gas. Answer2: water. Answer3: wind. Answer4: clouds.\n\n"
        "Answer format: answer1/answer2/answer3/answer4",
    ),
    (
        "ARC-Easy",
        "Which is a fruit?",
        ["rock", "apple", "car", "cloud", "shoe"],
        1,
        "Please choose the correct answer to the question: Which is a fruit?\n\n"
        "Answer1: rock Answer2: apple Answer3: car Answer4: cloud Answer5: shoe\n\n"
        "Answer format: answer1/answer2/answer3/answer4/answer5",
    ),
    (
        "openbookqa",
        "A hemisphere experiences summer when",
        ["it's tilted towards Jupiter", "it's angled towards the moon", "it's angled towards the largest star",
         "it spins"],
        2,
        "Please choose the correct answer to the question: A hemisphere experiences summer when\n\n"
        "Answer1: it's tilted towards Jupiter Answer2: it's angled towards the moon "
        "Answer3: it's angled towards the largest star Answer4: it spins\n\n"
        "Answer format: answer1/answer2/answer3/answer4",
    ),
]


@pytest.mark.parametrize("task, question, options, label, instruction", CASES, ids=[c[0] for c in CASES])
def test_format_item_matches_llm_adapters(task, question, options, label, instruction):
    word = answer_words(task, len(options))[label]
    assert format_item(task, question, options, label) == {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {word}",
        "answer": word,
    }


def test_cases_cover_every_task():
    assert {case[0] for case in CASES} == set(COMMONSENSE_TASKS)


def test_label_outside_options_is_rejected():
    with pytest.raises(ValueError, match="label=2 .* 2 options of a piqa item"):
        format_item("piqa", "q", ["a", "b"], 2)


@pytest.mark.parametrize(
    "name, canonical",
    [("ARC-Easy", "ARC-Easy"), ("arc_easy", "ARC-Easy"), ("arc-c", "ARC-Challenge"), ("SIQA", "social_i_qa"),
     ("obqa", "openbookqa"), (" BoolQ ", "boolq"), ("Social-I-QA", "social_i_qa")],
)
def test_canonical_task(name, canonical):
    assert canonical_task(name) == canonical


def test_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="task='mmlu'.*boolq.*openbookqa"):
        canonical_task("mmlu")


@pytest.mark.parametrize(
    "query, n, stem, options",
    [
        ("Question: Why?\n A. x\n B. y\nAnswer:", 2, "Question: Why?", ["x", "y"]),
        ("P1\nP2\nQuestion: ok?\n A. yes\n B. no\nAnswer:", 2, "P1\nP2\nQuestion: ok?", ["yes", "no"]),
        ("Ctx\nChoose:\n A. , then a\n B. b\n C. c. d\n D. e\nAnswer:", 4, "Ctx\nChoose:",
         [", then a", "b", "c. d", "e"]),
    ],
)
def test_split_mc_query(query, n, stem, options):
    assert split_mc_query(query, n) == (stem, options)


@pytest.mark.parametrize(
    "query, n, match", [("Q\n A. x\n B. y", 2, "does not end"), ("Q\n A. x\nAnswer:", 2, "no option 'B'")]
)
def test_split_mc_query_rejects_other_shapes(query, n, match):
    with pytest.raises(ValueError, match=match):
        split_mc_query(query, n)
