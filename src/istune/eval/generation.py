"""Evaluation by generation: prompt, generate greedily (or by beam search), extract, compare.

This is the LLM-Adapters protocol. Prompts are batched with left padding
and an attention mask, so every row's last prompt token sits at the same
position and generation continues from there; only the new tokens are
decoded. Padding is done here, so the tokenizer is never modified.

Example::

    result = evaluate_generation(model, tokenizer, items, task="piqa", batch_size=16)
    print(result.accuracy, result.records[0]["response"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from istune.eval._modes import eval_mode, model_device
from istune.eval.answers import (
    DEFAULT_TOLERANCE,
    NUMBER_TASKS,
    extract_answer,
    is_correct,
    is_exact_task,
    normalize_task,
    parse_gold_number,
)
from istune.eval.prompt import default_prompt
from istune.eval.result import TaskResult

# LLM-Adapters' budgets: a label word needs few tokens, a worked solution many.
COMMONSENSE_MAX_NEW_TOKENS = 32
REASONING_MAX_NEW_TOKENS = 256


def default_max_new_tokens(task: str) -> int:
    """LLM-Adapters' generation budget for ``task``: 32 for commonsense, 256 for math."""
    name = normalize_task(task)
    return REASONING_MAX_NEW_TOKENS if name in NUMBER_TASKS or name == "aqua" else COMMONSENSE_MAX_NEW_TOKENS


def exact_answer_budget(tokenizer: Any, items: Sequence[dict[str, Any]]) -> int:
    """An exact-match task's generation budget: the longest gold answer's tokens (as trained, after a space)
    and 2 more, room for the end of the answer and EOS; a longer response is wrong anyway."""
    return max(len(tokenizer(" " + str(item["answer"]), add_special_tokens=False)["input_ids"]) for item in items) + 2


def _pad_id(tokenizer: Any) -> int:
    """Id written into padded positions (masked out, so any token does): pad, else EOS, else 0."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to ``[batch, max_len]`` ids and attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def generate_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = COMMONSENSE_MAX_NEW_TOKENS,
    num_beams: int = 1,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Generate a response for each prompt, in input order.

    Prompts are sorted by token length before batching (less padding) and
    the responses put back in input order. The model runs in eval mode
    without gradients; its train/eval flags are restored afterwards.

    Args:
        model: A causal LM with ``generate`` (transformers model or PeftModel).
        tokenizer: Its tokenizer; not modified.
        prompts: Full prompt texts.
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Most tokens generated per prompt.
        num_beams: 1 for greedy decoding, more for beam search (never sampling).
        progress: Show a tqdm bar over batches.
        desc: Label of the progress bar.

    Returns:
        The decoded new tokens of each prompt, special tokens dropped, stripped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be at least 1 (1 is greedy decoding)")
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts at positions {empty} have no tokens; generation needs a non-empty prompt")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad_id, device = _pad_id(tokenizer), model_device(model)
    responses: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc=desc, disable=not progress):
            batch = order[start : start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in batch], pad_id)
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=pad_id,
            )
            texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                responses[i] = text.strip()
    return responses


def check_generation_items(items: Sequence[dict[str, Any]], task: str) -> None:
    """Fail early, before any generation, on an unknown task or a missing or non-numeric gold answer."""
    name = normalize_task(task)
    for index, item in enumerate(items):
        if "answer" not in item:
            raise KeyError(f"item {index} of task {task!r} has no 'answer' (keys: {sorted(item)}); "
                           "add the gold answer")
        if name in NUMBER_TASKS:
            parse_gold_number(item["answer"])


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    task: str,
    *,
    prompt_fn: Callable[[dict[str, Any]], str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    ignore_case: bool = False,
    progress: bool = False,
) -> TaskResult:
    """Accuracy of ``model`` on ``items`` of ``task`` by generation and answer extraction.

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer.
        items: Eval items, each with a gold ``answer`` and either a ``prompt``
            or an ``instruction`` (and optional ``input``).
        task: Task name; chooses the extraction rule (see ``istune.eval.answers``).
        prompt_fn: Item to prompt text; default ``default_prompt`` (the training template).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Generation budget; default ``default_max_new_tokens(task)``, or for an exact-match
            task ``exact_answer_budget``.
        num_beams: 1 for greedy, more for beam search.
        tolerance: Absolute tolerance of numeric answers.
        ignore_case: Accept capitalised commonsense answer words.
        progress: Show a tqdm bar.

    Returns:
        A ``TaskResult`` with method ``"generate"``; each record holds
        ``index``, ``response``, ``prediction``, ``answer`` and ``correct``.
    """
    name = normalize_task(task)
    check_generation_items(items, task)
    prompt_fn = prompt_fn or default_prompt
    prompts = [prompt_fn(item) for item in items]
    if max_new_tokens is None and is_exact_task(name) and items:
        max_new_tokens = exact_answer_budget(tokenizer, items)
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens or default_max_new_tokens(name),
        num_beams=num_beams,
        progress=progress,
        desc=task,
    )
    records = []
    for index, (item, response) in enumerate(zip(items, responses)):
        prediction = extract_answer(name, response, ignore_case=ignore_case)
        correct = is_correct(name, prediction, item["answer"], tolerance=tolerance)
        records.append(
            {
                "index": index,
                "response": response,
                "prediction": prediction,
                "answer": item["answer"],
                "correct": correct,
            }
        )
    return TaskResult(
        task=task, method="generate", correct=sum(r["correct"] for r in records), total=len(records), records=records
    )
