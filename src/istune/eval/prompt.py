"""The generation prompt of an eval item, with a fallback when istune.data is absent.

The training template lives in ``istune.data.llm_adapters.generate_prompt``;
evaluation must use the same text. ``default_prompt`` imports it lazily so
this package works (with an identical Alpaca/LLM-Adapters template) before
or without the data package.
"""

from __future__ import annotations

from typing import Any

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - LLM-Adapters' name
    """The Alpaca/LLM-Adapters prompt, ending right where the response starts."""
    if input:
        return _WITH_INPUT.format(instruction=instruction, input=input)
    return _WITHOUT_INPUT.format(instruction=instruction)


def default_prompt(item: dict[str, Any]) -> str:
    """Prompt text for an eval item.

    An item's own ``prompt`` wins; otherwise ``instruction`` and ``input``
    go through ``istune.data.llm_adapters.generate_prompt``, or through
    ``alpaca_prompt`` when that module cannot be imported.

    Args:
        item: An eval item with ``prompt``, or ``instruction`` and optional ``input``.

    Returns:
        The full prompt text.

    Raises:
        KeyError: If the item has neither ``prompt`` nor ``instruction``.
    """
    if "prompt" in item:
        return item["prompt"]
    if "instruction" not in item:
        raise KeyError(
            f"eval item has neither 'prompt' nor 'instruction' (keys: {sorted(item)}); "
            "add an 'instruction' or pass prompt_fn"
        )
    try:
        from istune.data.llm_adapters import generate_prompt
    except ImportError:
        generate_prompt = alpaca_prompt
    return generate_prompt(item["instruction"], item.get("input") or None)
