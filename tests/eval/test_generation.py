"""Batched generation: left padding, order, extraction, and restoring model and tokenizer state."""

import pytest
import torch

from istune.eval.generation import default_max_new_tokens, evaluate_generation, generate_responses

PROMPTS = [
    "the cat sat on the mat because",
    "a dog",
    "it was red so the dog ran to the park and",
    "question : true or false ?",
    "the",
]


class EchoLastToken(torch.nn.Module):
    """Stub LM whose "generation" repeats each row's last prompt column.

    With left padding the last column is every row's real last token, so the
    response is that word; with right padding shorter rows would answer with
    padding. It also records the modes it was called in.
    """

    def __init__(self, repeat: int = 1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.repeat = repeat
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, num_beams, do_sample, pad_token_id):
        self.calls.append(
            {
                "training": self.training,
                "grad": torch.is_grad_enabled(),
                "mask": attention_mask.clone(),
                "num_beams": num_beams,
                "do_sample": do_sample,
                "max_new_tokens": max_new_tokens,
            }
        )
        return torch.cat([input_ids, input_ids[:, -1:].repeat(1, self.repeat)], dim=1)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_matches_one_by_one(model, tokenizer, num_beams):
    """Left-padded batches give the same text as unpadded single-prompt generation."""
    model.eval()  # the reference below must not use dropout either
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=6, num_beams=num_beams)
    single = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, num_beams=num_beams, do_sample=False, pad_token_id=0)
        single.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    assert batched == single
    assert any(batched)  # the random model did say something


@pytest.mark.parametrize("training", [True, False])
def test_restores_model_mode_and_tokenizer(tokenizer, training):
    model = EchoLastToken()
    model.train(training)
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    generate_responses(model, tokenizer, PROMPTS, batch_size=2)
    assert model.training is training
    assert (tokenizer.padding_side, tokenizer.pad_token) == (padding_side, pad_token)
    assert all(not call["training"] and not call["grad"] and not call["do_sample"] for call in model.calls)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
def test_left_padding_and_input_order(tokenizer, batch_size):
    model = EchoLastToken()
    responses = generate_responses(model, tokenizer, PROMPTS, batch_size=batch_size, progress=batch_size == 2)
    assert responses == [prompt.split()[-1] for prompt in PROMPTS]
    assert len(model.calls) == -(-len(PROMPTS) // batch_size)
    for call in model.calls:
        mask = call["mask"]
        assert mask[:, -1].all()  # padding on the left: every row ends with a real token
        assert (mask.cummax(dim=1).values == mask).all()  # zeros only before ones


# (task, prompt, gold answer, expected prediction, correct)
ITEMS = [
    ("piqa", "question : the correct answer is solution2", "solution2", "solution2", True),
    ("piqa", "question : solution1", "solution2", "solution1", False),
    ("boolq", "question : true", "true", "true", True),
    ("gsm8k", "question : the answer is 42", "42", 42.0, True),
    ("gsm8k", "question : 7", "42.0", 7.0, False),
    ("winogrande", "question : the dog ran", "option1", None, False),
    ("task:count", "question : 7", "7", "7", True),  # exact match: the response's first line
    ("task:count", "question : 42", "4", "42", False),
]


@pytest.mark.parametrize(("task", "prompt", "answer", "prediction", "correct"), ITEMS)
def test_evaluate_generation_records(tokenizer, task, prompt, answer, prediction, correct):
    items = [{"prompt": prompt, "answer": answer}]
    result = evaluate_generation(EchoLastToken(), tokenizer, items, task)
    assert result.method == "generate" and result.total == 1
    assert result.records == [
        {"index": 0, "response": prompt.split()[-1], "prediction": prediction, "answer": answer, "correct": correct}
    ]
    assert result.accuracy == float(correct)


def test_evaluate_generation_accuracy_prompt_fn_and_budget(tokenizer):
    items = [
        {"q": "the correct answer is solution1", "answer": "solution1"},
        {"q": "a solution2", "answer": "solution1"},
        {"q": "the cat sat on the mat solution2", "answer": "solution2"},
    ]
    model = EchoLastToken()
    result = evaluate_generation(model, tokenizer, items, "piqa", prompt_fn=lambda item: item["q"], batch_size=2)
    assert [r["prediction"] for r in result.records] == ["solution1", "solution2", "solution2"]
    assert (result.correct, result.total) == (2, 3)
    assert result.accuracy == pytest.approx(2 / 3)
    assert {call["max_new_tokens"] for call in model.calls} == {default_max_new_tokens("piqa")} == {32}


def test_an_exact_match_task_generates_its_longest_answer_and_two_tokens_more(tokenizer):
    items = [{"prompt": "question : 7", "answer": "7"}, {"prompt": "question : 1", "answer": "the cat sat"}]
    model = EchoLastToken()
    evaluate_generation(model, tokenizer, items, "task:count")
    assert {call["max_new_tokens"] for call in model.calls} == {3 + 2}


def test_default_max_new_tokens():
    assert [default_max_new_tokens(t) for t in ("boolq", "ARC-Easy", "gsm8k", "AQuA")] == [32, 32, 256, 256]


@pytest.mark.parametrize(
    ("items", "task", "kwargs", "error", "message"),
    [
        ([{"prompt": "a"}], "piqa", {}, KeyError, "item 0 of task 'piqa' has no 'answer'"),
        ([{"prompt": "a", "answer": "many"}], "gsm8k", {}, ValueError, "answer='many' is not a number"),
        ([{"prompt": "a", "answer": "true"}], "boolq", {"batch_size": 0}, ValueError, "batch_size=0"),
        ([{"prompt": "a", "answer": "true"}], "boolq", {"num_beams": 0}, ValueError, "num_beams=0"),
        ([{"prompt": "a", "answer": "true"}], "mmlu", {}, ValueError, "task='mmlu'"),
        ([{"input": "a", "answer": "true"}], "boolq", {}, KeyError, "neither 'prompt' nor 'instruction'"),
        ([{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "1"}], "gsm8k", {}, ValueError, r"positions \[1\]"),
    ],
)
def test_evaluate_generation_errors(tokenizer, items, task, kwargs, error, message):
    with pytest.raises(error, match=message):
        evaluate_generation(EchoLastToken(), tokenizer, items, task, **kwargs)
