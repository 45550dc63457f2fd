"""--harness: lm-eval's own task definitions on the packaged items, checked against istune's scoring.

A tiny random model with a byte-level tokenizer (every byte one token, so no text is
unknown and tokenizing context and option together or apart gives the same tokens).
"""

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from istune.data import load_eval_items  # noqa: E402
from istune.data.commonsense_format import COMMONSENSE_TASKS  # noqa: E402
from istune.eval.harness import build_task, harness_docs, run_harness  # noqa: E402
from istune.eval.scoring import evaluate_scoring, option_logprobs  # noqa: E402

# Tasks whose lm-eval prompt and options are istune's own scoring context and options.
SAME_DEFINITION = ["piqa", "ARC-Easy", "ARC-Challenge", "boolq"]


def make_byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    items = load_eval_items(list(COMMONSENSE_TASKS), 4, seed=0)
    return model, tokenizer, items, run_harness(model, tokenizer, items, batch_size=3)


def lm_eval_requests(task, doc):
    """(context, continuation) pairs as lm-eval builds them, and the gold index."""
    text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
    delimiter = task.config.target_delimiter
    if isinstance(text, int):  # WinoGrande: the options are contexts, the rest of the sentence is scored
        return [(context, delimiter + target) for context in choices], text, choices
    return [(text, delimiter + choice) for choice in choices], target, choices


def test_prompts_follow_lm_eval_and_coincide_with_istune_where_defined_alike():
    items = load_eval_items(list(COMMONSENSE_TASKS), 4, seed=0)
    for name, rows in items.items():
        task = build_task(name, harness_docs(name, rows))
        for doc, item in zip(task.eval_docs, rows):
            text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
            if name in ("piqa", "ARC-Easy", "ARC-Challenge"):
                assert (text, choices, target) == (item["context"], item["options"], item["label"])
            elif name == "boolq":  # lm-eval: ["no", "yes"], label 1 = yes; istune: ["yes", "no"], label 0 = yes
                assert (text, choices, target) == (item["context"], ["no", "yes"], 1 - item["label"])
            elif name == "social_i_qa":
                assert text.startswith("Q: ") and text.endswith("\nA:") and choices == item["options"]
                assert target == item["label"]
            elif name == "openbookqa":
                assert item["context"] == f"Question: {text}\nAnswer:" and choices == item["options"]
                assert target == item["label"]
            elif name == "hellaswag":
                assert target == item["label"] and len(choices) == 4 and "[" not in text
            else:  # winogrande, partial scoring: doc_to_text is the gold index
                assert text == item["label"]
                sentence = item["context"].removeprefix("Fill in the blank: ").removesuffix("\nAnswer:")
                for context, option in zip(choices, item["options"]):  # context + rest = the filled-in sentence
                    assert f"{context} {target}".replace(" ", "") == sentence.replace("_", option).replace(" ", "")


def test_lm_eval_loglikelihoods_and_metrics_recomputed_by_istune(setup):
    """For every task: lm-eval's log-likelihoods are istune's option_logprobs of lm-eval's own strings,
    acc is their argmax, acc_norm the argmax per character of the option (without the delimiter)."""
    model, tokenizer, items, harness = setup
    for name, rows in items.items():
        task = build_task(name, harness_docs(name, rows))
        hits, norm_hits = [], []
        for doc, lls in zip(task.eval_docs, harness["loglikelihoods"][name]):
            pairs, gold, choices = lm_eval_requests(task, doc)
            ours = [total for total, _, _ in option_logprobs(model, tokenizer, pairs, batch_size=2)]
            np.testing.assert_allclose(lls, ours, rtol=1e-5, atol=1e-3, err_msg=name)
            hits.append(int(np.argmax(lls)) == gold)
            norm_hits.append(int(np.argmax(np.array(lls) / [len(c) for c in choices])) == gold)
        assert harness["tasks"][name]["acc"] == pytest.approx(np.mean(hits)), name
        if name == "winogrande":
            assert harness["tasks"][name]["acc_norm"] is None
        else:
            assert harness["tasks"][name]["acc_norm"] == pytest.approx(np.mean(norm_hits)), name


@pytest.mark.parametrize("name", SAME_DEFINITION)
def test_acc_equals_istune_option_scoring_where_definitions_coincide(setup, name):
    model, tokenizer, items, harness = setup
    ours = evaluate_scoring(model, tokenizer, items[name], name, batch_size=5)
    for record, lls in zip(ours.records, harness["loglikelihoods"][name]):
        expected = lls[::-1] if name == "boolq" else lls  # boolq's options in the other order
        np.testing.assert_allclose(record["logprobs"], expected, rtol=1e-5, atol=1e-3)
    assert harness["tasks"][name]["acc"] == pytest.approx(ours.accuracy)
    # acc_norm divides by the option's characters; istune's accuracy_per_char also counts the joining space.
    options = [item["options"] for item in items[name]]
    per_char = np.mean([int(np.argmax(np.array(r["logprobs"]) / [len(o) for o in opts])) == r["label"]
                        for r, opts in zip(ours.records, options)])
    with_space = np.mean([int(np.argmax(np.array(r["logprobs"]) / [len(o) + 1 for o in opts])) == r["label"]
                          for r, opts in zip(ours.records, options)])
    assert harness["tasks"][name]["acc_norm"] == pytest.approx(per_char)
    assert ours.metrics["accuracy_per_char"] == pytest.approx(with_space)


def test_docs_are_exactly_the_items_given():
    items = load_eval_items(["piqa"], 5, seed=3)["piqa"]
    docs = harness_docs("piqa", items)
    assert [(d["goal"], [d["sol1"], d["sol2"]], d["label"]) for d in docs] == \
        [(i["context"].removeprefix("Question: ").removesuffix("\nAnswer:"), i["options"], i["label"]) for i in items]
    with pytest.raises(ValueError, match="not in the packaged split"):
        harness_docs("piqa", [{**items[0], "id": "no-such-id"}])
    with pytest.raises(ValueError, match="no lm-eval definition"):
        harness_docs("gsm8k", items)
