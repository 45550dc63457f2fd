"""Option scoring: batched log-likelihoods against a manual one-at-a-time reference."""

import math

import pytest
import torch

from istune.eval.scoring import evaluate_scoring, option_logprobs

from .conftest import SlicingLM, make_tokenizer

ITEMS = [
    {"context": "the cat sat on the", "options": ["mat", "dog ran to the park", "red"], "label": 0},
    {"context": "question : true or false ?", "options": ["true", "false"], "label": 1},
    {"context": "it was", "options": ["red", "blue", "green", "very very good"], "label": 2},
    {"context": "a dog ran to the park because it was", "options": ["good", "bad"], "label": 0},
]


def reference_logprob(model, tokenizer, context: str, option: str) -> float:
    """Tokenize ``context + " " + option`` as one string; sum log-softmax over the option's last tokens."""
    full = tokenizer(f"{context} {option}")["input_ids"]
    n_option = len(tokenizer(f" {option}", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double()
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return sum(logprobs[t - 1, full[t]].item() for t in range(len(full) - n_option, len(full)))


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_matches_unbatched_reference(model, batch_size, add_bos):
    model.eval()
    tokenizer = make_tokenizer(add_bos=add_bos)
    assert (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) is add_bos
    pairs = [(item["context"], option) for item in ITEMS for option in item["options"]]
    got = option_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    for (context, option), (total, n_tokens, n_chars) in zip(pairs, got):
        assert total == pytest.approx(reference_logprob(model, tokenizer, context, option), abs=1e-4)
        assert n_tokens == len(option.split())
        assert n_chars == len(option) + 1  # the joining space belongs to the option


def test_evaluate_scoring_predictions_follow_the_logprobs(model, tokenizer):
    model.train()
    result = evaluate_scoring(model, tokenizer, ITEMS, "piqa", batch_size=4)
    assert model.training  # restored
    assert result.method == "score" and result.total == len(ITEMS)
    for item, record in zip(ITEMS, result.records):
        logprobs = record["logprobs"]
        assert len(logprobs) == len(item["options"])
        assert record["prediction"] == max(range(len(logprobs)), key=logprobs.__getitem__)
        per_token = [s / n for s, n in zip(logprobs, record["num_tokens"])]
        assert record["prediction_per_token"] == max(range(len(per_token)), key=per_token.__getitem__)
        assert record["correct"] == (record["prediction"] == item["label"])
    assert result.correct == sum(r["correct"] for r in result.records)
    # Relabel every item with its prediction: accuracy must be exactly 1.
    relabeled = [{**item, "label": r["prediction"]} for item, r in zip(ITEMS, result.records)]
    assert evaluate_scoring(model, tokenizer, relabeled, "piqa").accuracy == 1.0


class UnigramLM(torch.nn.Module):
    """Stub LM whose next-token distribution ignores the context: log p(token) is a fixed table."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.table.expand(*input_ids.shape, -1)})()


def test_sum_and_length_normalized_disagree(tokenizer):
    """A long option of likely tokens loses on the sum and wins per token and per char."""
    vocab = tokenizer.get_vocab()
    logits = torch.full((len(vocab),), -10.0)
    logits[vocab["good"]] = 0.0  # likely token
    logits[vocab["bad"]] = -0.5  # log p: good -0.47, bad -0.97 (others negligible)
    model = UnigramLM(logits)
    log_p = torch.log_softmax(logits, dim=-1)
    item = {"context": "it was", "options": ["bad", "good good good good"], "label": 1}
    result = evaluate_scoring(model, tokenizer, [item], "toy")
    record = result.records[0]
    assert record["logprobs"] == pytest.approx([log_p[vocab["bad"]].item(), 4 * log_p[vocab["good"]].item()])
    assert record["num_tokens"] == [1, 4]
    assert (record["prediction"], record["prediction_per_token"], record["prediction_per_char"]) == (0, 1, 1)
    assert result.accuracy == 0.0
    assert result.metrics == {"accuracy_per_token": 1.0, "accuracy_per_char": 1.0}


@pytest.mark.parametrize(
    ("context", "option", "chars"),
    [
        ("the cat", "sat", len(" sat")),  # delimiter added
        ("the cat ", "sat", len(" sat")),  # context's trailing space moves to the option
        ("the cat", " sat", len(" sat")),  # option already starts with a space
        ("", "sat", len(" sat")),  # empty context: scored after the BOS token
    ],
)
def test_whitespace_seam(tokenizer, context, option, chars):
    model = UnigramLM(torch.zeros(len(tokenizer)))
    [(total, n_tokens, n_chars)] = option_logprobs(model, tokenizer, [(context, option)])
    assert (n_tokens, n_chars) == (1, chars)
    assert total == pytest.approx(-math.log(len(tokenizer)))


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ({"context": "a", "label": 0}, KeyError, r"lacks \['options'\]"),
        ({"options": ["a", "b"], "label": 0}, KeyError, r"lacks \['context'\]"),
        ({"context": "a", "options": ["a"], "label": 0}, ValueError, "at least 2"),
        ({"context": "a", "options": ["a", "b"], "label": 2}, ValueError, "label=2"),
        ({"context": "a", "options": ["a", "b"], "label": "solution1"}, ValueError, "label='solution1'"),
        ({"context": "a", "options": ["a", ""], "label": 0}, ValueError, "non-empty"),
    ],
)
def test_errors(tokenizer, item, error, message):
    model = UnigramLM(torch.zeros(len(tokenizer)))
    with pytest.raises(error, match=message):
        evaluate_scoring(model, tokenizer, [item], "piqa")


SHARED_FAMILIES = ["llama", "gpt2", "opt", "gpt_neox", "qwen2", "gemma", "phi"]


def no_fallback(monkeypatch):
    from istune.eval import scoring

    def fail(*args, **kwargs):
        raise AssertionError("the shared-context path fell back to one sequence per pair")

    monkeypatch.setattr(scoring, "_pairwise_sums", fail)


@pytest.mark.parametrize("family", SHARED_FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_context_gives_the_pairwise_scores(family, batch_size, monkeypatch):
    """Each context once with its KV cache copied per option: same sums and predictions as pair by pair."""
    from tests.tiny_models import tiny_model

    model, tokenizer = tiny_model(family), make_tokenizer(add_bos=family == "llama")
    items = ITEMS + [{"context": "a dog", "options": ["sat", "ran"], "label": 1}]  # one-token options only
    before = evaluate_scoring(model, tokenizer, items, "piqa", batch_size=batch_size, share_context=False)
    no_fallback(monkeypatch)
    after = evaluate_scoring(model, tokenizer, items, "piqa", batch_size=batch_size)
    for old, new in zip(before.records, after.records):
        assert new["logprobs"] == pytest.approx(old["logprobs"], abs=1e-4)
        assert {k: v for k, v in new.items() if k != "logprobs"} == {k: v for k, v in old.items() if k != "logprobs"}
    assert (after.correct, after.metrics) == (before.correct, before.metrics)


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_shared_context_through_adapters(method, monkeypatch):
    from tests.tiny_models import peft_model

    model, tokenizer = peft_model("llama", method), make_tokenizer()
    pairs = [(item["context"], option) for item in ITEMS for option in item["options"]]
    before = option_logprobs(model, tokenizer, pairs, batch_size=4, share_context=False)
    no_fallback(monkeypatch)
    after = option_logprobs(model, tokenizer, pairs, batch_size=4)
    assert [a[1:] for a in after] == [b[1:] for b in before]
    assert [a[0] for a in after] == pytest.approx([b[0] for b in before], abs=1e-4)
    assert model.training  # restored


def test_a_model_without_cache_arguments_falls_back(tokenizer):
    """The unigram stub takes only input_ids and attention_mask: scored pair by pair, same numbers."""
    vocab = tokenizer.get_vocab()
    model = UnigramLM(torch.log_softmax(torch.randn(len(vocab)), dim=-1))
    pairs = [(item["context"], option) for item in ITEMS for option in item["options"]]
    assert option_logprobs(model, tokenizer, pairs) == option_logprobs(model, tokenizer, pairs, share_context=False)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_transformers_5_17_keeps_the_shared_path(batch_size, monkeypatch):
    """A forward that slices with logits_to_keep and names its cache past_key_values (transformers 5.6-5.17):
    still each context once, the same sums; the mask is tried at the first batch only."""
    from tests.tiny_models import tiny_model

    inner, tokenizer = tiny_model("llama"), make_tokenizer()
    pairs = [(item["context"], option) for item in ITEMS for option in item["options"]]
    before = option_logprobs(inner, tokenizer, pairs, batch_size=batch_size, share_context=False)
    model = SlicingLM(inner)
    no_fallback(monkeypatch)
    after = option_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    assert [a[1:] for a in after] == [b[1:] for b in before]
    assert [a[0] for a in after] == pytest.approx([b[0] for b in before], abs=1e-4)
    assert model.refused == 1
