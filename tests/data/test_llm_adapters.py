"""The LLM-Adapters template (exact text) and the file loader (formats, errors)."""

from __future__ import annotations

import pytest

from istune.data.llm_adapters import generate_prompt, load_llm_adapters_json

INDENT = " " * 16  # LLM-Adapters' indentation inside the template
FINETUNE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    f"{INDENT}### Instruction:\n"
    f"{INDENT}Add the numbers.\n"
    f"{INDENT}\n"
    f"{INDENT}### Input:\n"
    f"{INDENT}2 and 3\n"
    f"{INDENT}\n"
    f"{INDENT}### Response:\n"
    f"{INDENT}5"
)
FINETUNE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    f"{INDENT}### Instruction:\n"
    f"{INDENT}Add the numbers.\n"
    f"{INDENT}\n"
    f"{INDENT}### Response:\n"
    f"{INDENT}5"
)
EVALUATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    f"{INDENT}### Instruction:\n"
    f"{INDENT}Add the numbers.\n"
    "\n"
    f"{INDENT}### Input:\n"
    f"{INDENT}2 and 3\n"
    "\n"
    f"{INDENT}### Response:\n"
    f"{INDENT}5"
)
EVALUATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    f"{INDENT}### Instruction:\n"
    f"{INDENT}Add the numbers.\n"
    "\n"
    f"{INDENT}### Response:\n"
    f"{INDENT}5"
)


@pytest.mark.parametrize(
    "input_text, style, expected",
    [
        ("2 and 3", "finetune", FINETUNE_WITH_INPUT),
        ("", "finetune", FINETUNE_NO_INPUT),
        (None, "finetune", FINETUNE_NO_INPUT),
        ("2 and 3", "evaluate", EVALUATE_WITH_INPUT),
        ("", "evaluate", EVALUATE_NO_INPUT),
    ],
)
def test_template_text_is_exact(input_text, style, expected):
    assert generate_prompt("Add the numbers.", input_text, "5", style=style) == expected


@pytest.mark.parametrize("input_text", ["2 and 3", ""])
def test_generation_prompt_is_the_training_text_up_to_the_response(input_text):
    full = generate_prompt("Add the numbers.", input_text, "5")
    prompt = generate_prompt("Add the numbers.", input_text)
    assert full == prompt + "5"
    assert prompt.endswith(f"### Response:\n{INDENT}")


def test_unknown_style_names_the_choices():
    with pytest.raises(ValueError, match=r"style='chat'.*finetune.*evaluate"):
        generate_prompt("x", style="chat")


@pytest.mark.parametrize("jsonl", [False, True])
def test_load_fills_absent_input_and_answer(write_file, jsonl):
    rows = [
        {"instruction": "a", "input": "b", "output": "c", "answer": "d"},
        {"instruction": "e", "output": "f"},
        {"instruction": "g", "input": None, "output": "h", "answer": [2.0], "extra": 1},
    ]
    loaded = load_llm_adapters_json(write_file("data.json", rows, jsonl=jsonl))
    assert loaded == [
        {"instruction": "a", "input": "b", "output": "c", "answer": "d"},
        {"instruction": "e", "input": "", "output": "f", "answer": ""},
        {"instruction": "g", "input": "", "output": "h", "answer": [2.0], "extra": 1},
    ]


def test_load_without_output_when_not_required(write_file):
    path = write_file("test.json", [{"instruction": "q", "answer": "1"}])
    assert load_llm_adapters_json(path, require_output=False)[0]["output"] == ""


GOOD = {"instruction": "i", "output": "o"}


@pytest.mark.parametrize(
    "rows, fragments",
    [
        ([GOOD, {"output": "o"}], ["row 1", "'instruction'"]),
        ([GOOD, GOOD, {"instruction": "i"}], ["row 2", "'output'"]),
        ([{"instruction": 3, "output": "o"}], ["row 0", "'instruction'", "int", "string"]),
        ([GOOD, {"instruction": "i", "output": "o", "input": ["x"]}], ["row 1", "'input'", "list"]),
        ([{"instruction": "  ", "output": "o"}], ["row 0", "'instruction'", "empty"]),
        ([GOOD, "just text"], ["row 1", "str", "object"]),
    ],
)
@pytest.mark.parametrize("jsonl", [False, True])
def test_malformed_row_names_file_row_and_field(write_file, rows, fragments, jsonl):
    path = write_file("bad.json", rows, jsonl=jsonl)
    with pytest.raises(ValueError) as error:
        load_llm_adapters_json(path)
    message = str(error.value)
    for fragment in [str(path), *fragments]:
        assert fragment in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[{]", "not valid JSON"),
        ('{"instruction": "i", "output": "o"}\n{oops\n', "line 2"),
        ("[]", "no rows"),
        ("", "no rows"),
    ],
)
def test_unreadable_file_says_where(write_file, text, fragment):
    path = write_file("broken.json", text)
    with pytest.raises(ValueError, match=fragment) as error:
        load_llm_adapters_json(path)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_llm_adapters_json(tmp_path / "nope.json")
