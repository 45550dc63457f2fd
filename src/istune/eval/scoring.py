"""Evaluation by option scoring: pick the option the model finds most likely.

For an item with a ``context`` and options ``o_1 .. o_k``, the score of
option ``j`` is the summed log-probability of its tokens given the context,

    score_j = sum_t log p(o_j[t] | context, o_j[:t]),

and the prediction is ``argmax_j score_j``. Two length-normalized variants
are reported beside it: per token (``score_j / num_tokens_j``) and per
character (``score_j / len(continuation_j)``; the continuation includes the joining
space, which lm-eval's ``acc_norm`` leaves out of the length).

Context and option are tokenized separately and concatenated, so the
option's tokens are exactly the tokens scored; whitespace at the end of the
context is moved to the start of the option, and ``delimiter`` (a space by
default) joins them when neither side has whitespace at the seam. Batches are
right-padded with an attention mask. The options of one context share its
forward pass (a KV cache copied per option), and only the logits the sums use
are projected onto the vocabulary; see ``option_logprobs``.

Example::

    result = evaluate_scoring(model, tokenizer, items, task="piqa")
    print(result.accuracy, result.metrics["accuracy_per_char"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from istune.eval._modes import eval_mode, model_device
from istune.eval.logits import kept_logits
from istune.eval.result import TaskResult


def encode_option(tokenizer: Any, context: str, option: str, delimiter: str) -> tuple[list[int], list[int], str]:
    """Token ids of context and continuation, and the continuation text."""
    if not (context[-1:].isspace() or option[:1].isspace()):
        option = delimiter + option
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + option
    context_ids = tokenizer(stripped, add_special_tokens=True)["input_ids"] if stripped else []
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError(f"context={context!r} has no tokens and the tokenizer has no BOS or EOS to start from")
        context_ids = [start]
    option_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not option_ids:
        raise ValueError(f"option={option!r} has no tokens; options must be non-empty text")
    return context_ids, option_ids, continuation




def option_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    delimiter: str = " ",
    progress: bool = False,
    desc: str = "score",
    share_context: bool = True,
) -> list[tuple[float, int, int]]:
    """Summed log-probability of each option given its context.

    With ``share_context`` (the default), pairs with the same context run it once:
    the context goes through the model with a KV cache, the cache is copied for
    each of its options, and the options run after it with their own positions;
    only the logits the sums need are projected onto the vocabulary
    (``logits_to_keep``). The result is the pairwise computation's up to float
    rounding. On transformers 5.6-5.17 (the cache argument is ``past_key_values``, and a boolean
    ``logits_to_keep`` is not taken), and for a forward without ``logits_to_keep``, every logit is
    projected and the kept ones picked afterwards (``eval.logits.kept_logits``). A model whose forward
    lacks a cache argument or ``position_ids`` (a TypeError) falls back to one sequence per pair.

    Args:
        model: A causal LM returning ``logits`` of shape ``[batch, seq, vocab]``.
        tokenizer: Its tokenizer.
        pairs: ``(context, option)`` strings.
        batch_size: Sequences per forward pass: distinct contexts with ``share_context``
            (their options then run together), else context + option pairs.
        delimiter: Put between context and option when neither has whitespace at the seam.
        progress: Show a tqdm bar over batches.
        desc: Label of the progress bar.
        share_context: Run each distinct context once (see above).

    Returns:
        Per pair, in input order: ``(logprob_sum, num_option_tokens, num_option_chars)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    encoded = [encode_option(tokenizer, context, option, delimiter) for context, option in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: list[float] = [0.0] * len(encoded)
    with eval_mode(model):
        try:
            if share_context:
                _shared_context_sums(model, encoded, sums, batch_size, pad_id, progress, desc)
            else:
                _pairwise_sums(model, encoded, sums, batch_size, pad_id, progress, desc)
        except TypeError as error:  # the model's forward lacks an argument the shared path needs
            if not share_context or "argument" not in str(error):
                raise
            _pairwise_sums(model, encoded, sums, batch_size, pad_id, progress, desc)
    return [(total, len(option_ids), len(continuation)) for total, (_, option_ids, continuation) in zip(sums, encoded)]


def _pairwise_sums(model, encoded, sums, batch_size, pad_id, progress, desc) -> None:
    """One right-padded sequence per pair, longest first; fills ``sums`` in place."""
    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        batch = order[start : start + batch_size]
        rows = [encoded[i][0] + encoded[i][1] for i in batch]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        option_mask = torch.zeros_like(ids, dtype=torch.bool)  # True at the option's tokens
        for row_index, (i, row) in enumerate(zip(batch, rows)):
            ids[row_index, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[row_index, : len(row)] = 1
            option_mask[row_index, len(encoded[i][0]) : len(row)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # logits[:, t] predicts token t + 1: [batch, width - 1, vocab] against targets [batch, width - 1].
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(logprobs.device)
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        totals = (token_logprobs * option_mask[:, 1:].to(logprobs.device)).sum(dim=-1).tolist()
        for i, total in zip(batch, totals):
            sums[i] = total


def _shared_context_sums(model, encoded, sums, batch_size, pad_id, progress, desc) -> None:
    """Each distinct context once, its KV cache copied per option; fills ``sums`` in place.

    A batch holds ``batch_size`` groups (a context and all its options): one forward
    pass of the contexts, then one of all their options. Contexts are right-padded; options follow
    each context's last real token (``position_ids`` continue from it, the padded cache
    slots are masked). Logits are kept only at each context's last token (it predicts
    the option's first token) and at each option token but the last.
    """
    device = model_device(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context_ids, _, _) in enumerate(encoded):
        groups.setdefault(tuple(context_ids), []).append(i)
    ordered = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(encoded[i][1]) for i in g[1])))
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    takes_masks = True  # whether the forward takes a boolean logits_to_keep; learnt at the first batch
    for batch in tqdm(batches, desc=desc, disable=not progress):
        contexts = [list(context) for context, _ in batch]
        context_len = torch.tensor([len(c) for c in contexts])
        width = int(context_len.max())
        ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, context in enumerate(contexts):
            ids[row, : len(context)] = torch.tensor(context, dtype=torch.long)
            mask[row, : len(context)] = 1
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[torch.arange(len(contexts)), context_len - 1] = True
        out, kept, takes_masks = kept_logits(model, last.to(device), takes_masks, input_ids=ids.to(device),
                                              attention_mask=mask.to(device), use_cache=True)
        first = torch.log_softmax(kept.float(), dim=-1)  # [contexts, vocab]
        members = [(row, i) for row, (_, indices) in enumerate(batch) for i in indices]
        options = [encoded[i][1] for _, i in members]
        rows = torch.tensor([row for row, _ in members])
        totals = first[rows.to(first.device), torch.tensor([o[0] for o in options], device=first.device)]
        if max(len(o) for o in options) > 1:
            cache_name = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # 5.6-5.17
            cache = getattr(out, cache_name, None)
            if cache is None or not hasattr(cache, "batch_select_indices"):
                raise TypeError("model returned no KV cache; an argument the shared path needs is missing")
            cache.batch_select_indices(rows.to(device))
            option_width = max(len(o) for o in options)
            option_ids = torch.full((len(options), option_width), pad_id, dtype=torch.long)
            option_mask = torch.zeros_like(option_ids)
            keep = torch.zeros_like(option_ids, dtype=torch.bool)  # positions whose logits predict an option token
            for k, option in enumerate(options):
                option_ids[k, : len(option)] = torch.tensor(option, dtype=torch.long)
                option_mask[k, : len(option)] = 1
                keep[k, : len(option) - 1] = True
            positions = context_len[rows].unsqueeze(1) + torch.arange(option_width).unsqueeze(0)
            full_mask = torch.cat([mask[rows], option_mask], dim=1)
            _, kept, _ = kept_logits(model, keep.to(device), takes_masks, input_ids=option_ids.to(device),
                                      attention_mask=full_mask.to(device), position_ids=positions.to(device),
                                      use_cache=True, **{cache_name: cache})
            logprobs = torch.log_softmax(kept.float(), dim=-1)  # kept positions, row-major
            targets = option_ids[:, 1:][keep[:, :-1]].to(logprobs.device)
            rest = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            owner = torch.arange(len(options)).unsqueeze(1).expand_as(keep)[keep].to(rest.device)
            totals = totals.index_add(0, owner, rest)
        for (_, i), total in zip(members, totals.tolist()):
            sums[i] = total


def check_scoring_items(items: Sequence[dict[str, Any]], task: str) -> None:
    """Fail early, before any forward pass, on items without ``context``, ``options`` or a valid ``label``."""
    for index, item in enumerate(items):
        _check_item(index, item, task)


def _check_item(index: int, item: dict[str, Any], task: str) -> None:
    missing = [key for key in ("context", "options", "label") if key not in item]
    if missing:
        raise KeyError(
            f"item {index} of task {task!r} lacks {missing} (keys: {sorted(item)}); "
            "option scoring needs 'context', 'options' and 'label' (use method='generate' for open answers)"
        )
    options, label = item["options"], item["label"]
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise ValueError(f"item {index} of task {task!r}: options={options!r} must be a list of at least 2 strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(options):
        raise ValueError(
            f"item {index} of task {task!r}: label={label!r} must be an int index into its {len(options)} options"
        )


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # first index on ties


def evaluate_scoring(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    task: str,
    *,
    batch_size: int = 8,
    delimiter: str = " ",
    progress: bool = False,
    share_context: bool = True,
) -> TaskResult:
    """Accuracy of ``model`` on multiple-choice ``items`` by option log-likelihood.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        items: Eval items with ``context`` (str), ``options`` (list of str) and ``label`` (int).
        task: Task name, used for labels and messages only.
        batch_size: Items (contexts) per forward pass; their options run together after it.
        delimiter: Joins context and option (see module docstring).
        progress: Show a tqdm bar.
        share_context: Run each item's context once for all its options (see ``option_logprobs``).

    Returns:
        A ``TaskResult`` with method ``"score"``: ``accuracy`` from summed
        log-probabilities, ``metrics["accuracy_per_token"]`` and
        ``metrics["accuracy_per_char"]`` from the normalized scores. Records
        hold ``index``, ``label``, ``logprobs``, ``num_tokens``,
        ``prediction``, ``prediction_per_token``, ``prediction_per_char``, ``correct``.
    """
    check_scoring_items(items, task)
    pairs = [(item["context"], option) for item in items for option in item["options"]]
    scores = iter(
        option_logprobs(
            model, tokenizer, pairs, batch_size=batch_size, delimiter=delimiter, progress=progress, desc=task,
            share_context=share_context,
        )
    )
    records = []
    for index, item in enumerate(items):
        logprobs, num_tokens, num_chars = zip(*(next(scores) for _ in item["options"]))
        prediction = _argmax(logprobs)
        per_token = _argmax([s / n for s, n in zip(logprobs, num_tokens)])
        per_char = _argmax([s / n for s, n in zip(logprobs, num_chars)])
        records.append(
            {
                "index": index,
                "label": item["label"],
                "logprobs": list(logprobs),
                "num_tokens": list(num_tokens),
                "prediction": prediction,
                "prediction_per_token": per_token,
                "prediction_per_char": per_char,
                "correct": prediction == item["label"],
            }
        )
    total = len(records)

    def rate(key: str) -> float:
        return sum(r[key] == r["label"] for r in records) / total if total else 0.0

    return TaskResult(
        task=task,
        method="score",
        correct=sum(r["correct"] for r in records),
        total=total,
        records=records,
        metrics={"accuracy_per_token": rate("prediction_per_token"), "accuracy_per_char": rate("prediction_per_char")},
    )
