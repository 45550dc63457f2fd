"""Held-out loss: logits only where a label is, the same number as over every position."""

import pytest
import torch

from istune.data import CausalLMCollator, InstructionDataset
from istune.eval.loss import heldout_loss

from .conftest import SlicingLM, make_tokenizer

ROWS = [{"instruction": f"question a cat sat on the mat {'very ' * i}", "input": "",
         "output": "the correct answer is " + ("true" if i % 2 else "false")} for i in range(5)]


def full_logits_loss(model, examples, collate):
    """Reference: cross-entropy over every position, -100 ignored, token-weighted."""
    batch = collate([examples[i] for i in range(len(examples))])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100).item()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_loss_over_labelled_positions_only_equals_the_full_computation(family, batch_size):
    from tests.tiny_models import tiny_model

    model, tokenizer = tiny_model(family), make_tokenizer()
    examples = InstructionDataset(ROWS, tokenizer, 64, train_on_inputs=False)
    collate = CausalLMCollator(tokenizer)
    assert heldout_loss(model, examples, collate, batch_size) == pytest.approx(
        full_logits_loss(model, examples, collate), rel=1e-5)


class NoKeepLM(torch.nn.Module):
    """A model whose forward takes no logits_to_keep: the loss falls back to all positions."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_without_logits_to_keep_gives_the_same_loss():
    from tests.tiny_models import tiny_model

    inner, tokenizer = tiny_model("llama"), make_tokenizer()
    examples = InstructionDataset(ROWS, tokenizer, 64, train_on_inputs=False)
    collate = CausalLMCollator(tokenizer)
    expected = heldout_loss(inner, examples, collate, 2)
    assert heldout_loss(NoKeepLM(inner), examples, collate, 2) == pytest.approx(expected, rel=1e-6)


def test_a_model_that_slices_with_logits_to_keep_gives_the_same_loss():
    """transformers 5.6-5.17 slice with logits_to_keep (a boolean mask raises IndexError): every logit is
    projected and the labelled ones picked, the mask tried at the first batch only."""
    from tests.tiny_models import tiny_model

    inner, tokenizer = tiny_model("llama"), make_tokenizer()
    examples = InstructionDataset(ROWS, tokenizer, 64, train_on_inputs=False)
    collate = CausalLMCollator(tokenizer)
    model = SlicingLM(inner)
    assert heldout_loss(model, examples, collate, 2) == pytest.approx(full_logits_loss(inner, examples, collate),
                                                                      rel=1e-5)
    assert model.refused == 1  # three batches


@pytest.mark.parametrize("options", [{"padding_free": True}, {"labelled_logits_only": True},
                                     {"padding_free": True, "labelled_logits_only": True}])
def test_packed_and_labelled_batches_give_the_same_held_out_loss(options):
    from tests.tiny_models import tiny_model

    model, tokenizer = tiny_model("llama"), make_tokenizer()
    model.config.use_cache = True  # heldout_loss must turn the cache off for packed rows itself
    examples = InstructionDataset(ROWS, tokenizer, 64, train_on_inputs=False)
    assert heldout_loss(model, examples, CausalLMCollator(tokenizer, **options), 3) == pytest.approx(
        heldout_loss(model, examples, CausalLMCollator(tokenizer), 3), rel=1e-5)
