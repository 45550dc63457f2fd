"""evaluate_tasks: methods under separate keys, unweighted average, limit, and early errors."""

import pytest
import torch

from istune.eval.runner import evaluate_tasks

from .test_generation import EchoLastToken
from .test_scoring import UnigramLM


def make_items(n: int, correct: int, labels: tuple[str, str]) -> list[dict]:
    """``n`` items answered ``labels[0]``; the echo model gets the first ``correct`` right.

    Each prompt ends with the word the echo model will "generate"; option
    labels alternate 0, 1, 0, ... for scoring.
    """
    right, wrong = labels
    return [
        {
            "prompt": f"the correct answer is {right if i < correct else wrong}",
            "answer": right,
            "context": "it was",
            "options": ["good", "bad"],
            "label": i % 2,
        }
        for i in range(n)
    ]


class EchoAndUnigram(EchoLastToken):
    """Generates like EchoLastToken; scores like a unigram LM that prefers "good" (option 0)."""

    def __init__(self, vocab_size: int, good_id: int):
        super().__init__()
        logits = torch.zeros(vocab_size)
        logits[good_id] = 5.0
        self.scorer = UnigramLM(logits)

    def forward(self, input_ids, attention_mask):
        return self.scorer(input_ids, attention_mask)


@pytest.fixture
def echo(tokenizer):
    return EchoAndUnigram(len(tokenizer), tokenizer.get_vocab()["good"])


def test_methods_are_kept_apart_and_averaged_per_task(echo, tokenizer):
    tasks = {
        "piqa": make_items(2, correct=1, labels=("solution1", "solution2")),
        "winogrande": make_items(4, correct=4, labels=("option2", "option1")),
    }
    results = evaluate_tasks(echo, tokenizer, tasks, method=["generate", "score"], batch_size=3)
    assert list(results) == ["generate", "score"]
    generate, score = results["generate"], results["score"]
    assert generate["tasks"]["piqa"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert generate["tasks"]["winogrande"] == {"accuracy": 1.0, "correct": 4, "total": 4}
    assert generate["average"] == 0.75  # mean over tasks, not the pooled 5/6
    # Scoring always picks option 0 and labels alternate 0, 1, ...: half are right.
    assert score["tasks"]["piqa"]["accuracy"] == score["tasks"]["winogrande"]["accuracy"] == score["average"] == 0.5
    assert set(score["tasks"]["piqa"]) == {"accuracy", "correct", "total", "accuracy_per_token", "accuracy_per_char"}
    assert "response" in generate["records"]["piqa"][0] and "logprobs" in score["records"]["piqa"][0]


@pytest.mark.parametrize(("limit", "expected"), [(None, 5), (1, 1), (3, 3), (100, 5)])
def test_limit_takes_the_first_items(echo, tokenizer, limit, expected):
    tasks = {"piqa": make_items(5, correct=1, labels=("solution1", "solution2"))}
    results = evaluate_tasks(echo, tokenizer, tasks, limit=limit)
    assert list(results) == ["generate"]
    assert results["generate"]["tasks"]["piqa"] == {"accuracy": 1 / expected, "correct": 1, "total": expected}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "vote"}, ValueError, "method='vote'"),
        ({"method": []}, ValueError, r"method=\[\]"),
        ({"limit": 0}, ValueError, "limit=0"),
        ({"tasks": {}}, ValueError, "tasks is empty"),
        ({"tasks": {"piqa": []}}, ValueError, r"\['piqa'\] have no items"),
        (
            {"tasks": {"gsm8k": [{"prompt": "7", "answer": "7"}]}, "method": ["generate", "score"]},
            KeyError,
            "use method='generate'",
        ),
        ({"tasks": {"gsm8k": [{"prompt": "7", "answer": "seven"}]}}, ValueError, "answer='seven'"),
    ],
)
def test_errors_come_before_any_generation(echo, tokenizer, kwargs, error, message):
    kwargs = {"tasks": {"piqa": make_items(2, correct=1, labels=("solution1", "solution2"))}, **kwargs}
    with pytest.raises(error, match=message):
        evaluate_tasks(echo, tokenizer, **kwargs)
    assert echo.calls == []
