"""default_prompt: the item's own prompt, the data package's template, or the Alpaca fallback."""

import sys
import types

import pytest

from istune.eval.prompt import alpaca_prompt, default_prompt

MODULE = "istune.data.llm_adapters"

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nIs it red?\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nIs it red?\n\n### Input:\nA red cat.\n\n### Response:\n"
)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"instruction": "Is it red?", "input": ""}, ALPACA_NO_INPUT),
        ({"instruction": "Is it red?"}, ALPACA_NO_INPUT),
        ({"instruction": "Is it red?", "input": "A red cat."}, ALPACA_WITH_INPUT),
        ({"instruction": "ignored", "prompt": "my own prompt"}, "my own prompt"),
    ],
)
def test_fallback_template(monkeypatch, item, expected):
    monkeypatch.setitem(sys.modules, MODULE, None)  # makes the import fail
    assert default_prompt(item) == expected


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"instruction": "Q", "input": ""}, "<Q|None>"),  # empty input passed as None
        ({"instruction": "Q", "input": "ctx"}, "<Q|ctx>"),
    ],
)
def test_uses_data_package_template(monkeypatch, item, expected):
    fake = types.ModuleType(MODULE)
    fake.generate_prompt = lambda instruction, input=None: f"<{instruction}|{input}>"
    monkeypatch.setitem(sys.modules, MODULE, fake)
    assert default_prompt(item) == expected


def test_alpaca_prompt_ends_where_the_response_starts():
    assert alpaca_prompt("Q").endswith("### Response:\n")
