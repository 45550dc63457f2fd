"""Answer extraction and comparison: tables of real-looking model outputs."""

import pytest

from istune.eval.answers import (
    KNOWN_TASKS,
    extract_answer,
    extract_choice,
    is_correct,
    normalize_task,
    parse_gold_number,
    strip_continuation,
)

# (task, generated text, expected prediction)
COMMONSENSE = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "true or false? the correct answer is false", "true"),  # first match, as LLM-Adapters
    ("boolq", "That is untrue, so the correct answer is false", "false"),  # whole words only
    ("boolq", "True", None),  # case-sensitive, as LLM-Adapters
    ("boolq", "", None),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "the correct answer is solution2.", "solution2"),
    ("piqa", "Solution1 is wrong, the correct answer is solution2", "solution2"),  # capital S is not a label
    ("piqa", "solution1 is wrong, the correct answer is solution2", "solution1"),  # first match wins
    ("piqa", "the correct answer is solution12", None),
    ("piqa", "the correct answer is solution3", None),
    ("piqa", "I cannot decide between them.", None),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "the correct answer is answer4", None),  # SIQA has three answers
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending2 fits best; ending3 does not", "ending2"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "the correct answer is answer1", None),
    ("ARC-Easy", "the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "answer2", "answer2"),
    ("arc_challenge", "(answer3)", "answer3"),
    ("openbookqa", "the correct answer is answer4\n\n### Instruction:\nthe correct answer is answer1", "answer4"),
    ("openbookqa", "I am not sure.\n\n### Instruction:\nthe correct answer is answer1", None),  # invented next example
]

NUMBERS = [
    ("gsm8k", "The answer is 42.", 42.0),
    ("gsm8k", "The answer is 42.\n\n### Instruction:\nWhat is 3 + 4?\n\n### Response:\n7", 42.0),
    ("gsm8k", "She pays $1,234.50 in total.", 1234.5),
    ("gsm8k", "1,000,000 people live there", 1_000_000.0),
    ("gsm8k", "48 / 2 = 24 apples. 24 + 18 = 42. The answer is 42", 42.0),  # last number
    ("gsm8k", "It costs .5 dollars", 0.5),
    ("gsm8k", "3.14.", 3.14),
    ("gsm8k", "50%", 50.0),
    ("gsm8k", "no idea", None),
    ("gsm8k", "", None),
    ("svamp", "-3", -3.0),
    ("svamp", "The temperature drops to -3.5 degrees.", -3.5),
    ("mawps", "10-3 = 7", 7.0),
    ("AddSub", "12 - 5", 5.0),  # a spaced minus is an operator
    ("MultiArith", "x = 10-3", 3.0),  # a hyphen after a digit is an operator, not a sign
    ("SingleEq", "x = -7", -7.0),
]

LETTERS = [
    ("AQuA", "The answer is C", "C"),
    ("aqua", "The correct answer is C.", "C"),
    ("aqua", "A train travels 60 km in 1 hour, so 180 km in 3 hours. The answer is (D).", "D"),
    ("aqua", "Answer: (B)", "B"),
    ("aqua", "answer is option E", "E"),
    ("aqua", "The answer is A.\n\n### Instruction:\nThe answer is B", "A"),
    ("aqua", "Answer Choices: (A) 10 (B) 20 (C) 30 (D) 40 (E) 50\nThe answer is B", "B"),
    ("aqua", "(A) is wrong because it is too small, so (C)", "C"),  # last bracketed letter
    ("aqua", "B)", "B"),
    ("aqua", "x = 5 and y = 7. So C.", "C"),  # standalone letter
    ("aqua", "A is correct.", "A"),  # "A" before a verb is the option
    ("aqua", "A", "A"),
    ("aqua", "A man buys 3 apples and eats 1.", None),  # article only
    ("aqua", "A man buys 3 apples; D is the total.", "D"),
    ("aqua", "Because Alice and Bob each Earn Dollars", None),  # capitals inside words
    ("aqua", "the answer is a number", None),  # lower-case letters never count
    ("aqua", "", None),
]


EXACT = [  # the synthetic tasks: the first line, stripped, as it is
    ("task:reverse", " c b a\nreverse: d e f = f e d", "c b a"),
    ("task:add:digits=3", "1032 ### Instruction: 7", "1032"),
    ("task:cipher", "Q W", "Q W"),  # case is kept: exact match
    ("task:count", "  \n3\n4", "3"),  # leading blank lines skipped, as generation strips them
    ("task:count", " ", None),
]


@pytest.mark.parametrize(("task", "text", "expected"), COMMONSENSE + NUMBERS + LETTERS + EXACT)
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("boolq", "True, because the passage says so.", "true"),
        ("piqa", "Solution1 is wrong, the correct answer is solution2", "solution1"),
        ("winogrande", "OPTION2", "option2"),
    ],
)
def test_extract_choice_ignore_case(task, text, expected):
    assert extract_choice(task, text, ignore_case=True) == expected


# (task, prediction, gold, tolerance, expected)
CORRECTNESS = [
    ("gsm8k", 42.0, "42", 1e-4, True),
    ("gsm8k", 42.00005, "42", 1e-4, True),
    ("gsm8k", 42.001, "42", 1e-4, False),
    ("gsm8k", 42.001, "42", 1e-2, True),
    ("gsm8k", 1234.5, "1,234.5", 1e-4, True),
    ("gsm8k", None, "42", 1e-4, False),
    ("svamp", -3.0, -3, 1e-4, True),
    ("svamp", 3.0, "-3", 1e-4, False),
    ("piqa", "solution2", "solution2", 1e-4, True),
    ("piqa", "solution1", "solution2", 1e-4, False),
    ("boolq", "true", " true ", 1e-4, True),
    ("boolq", None, "true", 1e-4, False),
    ("aqua", "C", "C", 1e-4, True),
    ("aqua", "C", "c", 1e-4, True),
    ("aqua", "B", "C", 1e-4, False),
    ("task:add", "1032", " 1032", 1e-4, True),
    ("task:add", "1032.0", "1032", 1e-4, False),  # exact, not numeric
    ("task:cipher", "q w", "q  w", 1e-4, False),
]


@pytest.mark.parametrize(("task", "prediction", "gold", "tolerance", "expected"), CORRECTNESS)
def test_is_correct(task, prediction, gold, tolerance, expected):
    assert is_correct(task, prediction, gold, tolerance=tolerance) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ARC-Easy", "arc_easy"),
        ("ARC-Challenge", "arc_challenge"),
        ("SVAMP", "svamp"),
        ("AQuA", "aqua"),
        ("siqa", "social_i_qa"),
        ("OBQA", "openbookqa"),
        ("MultiArith", "multiarith"),
    ],
)
def test_normalize_task(name, expected):
    assert normalize_task(name) == expected
    assert expected in KNOWN_TASKS


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: normalize_task("mmlu"), r"task='mmlu'.*boolq"),
        (lambda: extract_choice("gsm8k", "42"), r"task='gsm8k' is not a commonsense task"),
        (lambda: parse_gold_number("forty"), r"answer='forty' is not a number"),
    ],
)
def test_errors_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("gold", "expected"), [("42", 42.0), ("1,234", 1234.0), (" -3.5 ", -3.5), (7, 7.0), ("#### 18", 18.0)]
)
def test_parse_gold_number(gold, expected):
    assert parse_gold_number(gold) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42\n\n### Instruction:\nmore", "42\n\n"),
        ("42 ### Response: 7", "42 "),
        ("no header", "no header"),
        ("## input: x", ""),
    ],
)
def test_strip_continuation(text, expected):
    assert strip_continuation(text) == expected
