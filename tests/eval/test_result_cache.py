"""The base-model result cache: a repeat hits (no forward pass), a change of items, method, weights or code misses."""

import pytest
import torch

from istune.data import CausalLMCollator, InstructionDataset
from istune.eval import result_cache
from istune.eval.cached import evaluate_base, evaluate_model
from istune.eval.result_cache import ResultCache, folder_fingerprint
from istune.models import load_model_and_tokenizer

from .conftest import make_model, make_tokenizer

ITEMS = {
    "piqa": [
        {"instruction": "question a cat sat on the mat", "answer": "solution1", "context": "the cat sat on the",
         "options": ["mat", "dog ran to the park"], "label": 0},
        {"instruction": "question it was red", "answer": "solution2", "context": "it was",
         "options": ["red", "very very good"], "label": 1},
    ],
    "boolq": [
        {"instruction": "question true or false ?", "answer": "true", "context": "question : true or false ?",
         "options": ["true", "false"], "label": 0},
    ],
}
HELDOUT = [{"instruction": "question a dog ran", "input": "", "output": "the correct answer is true"}]


def save_model(folder, seed: int = 0):
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = make_model("llama", len(tokenizer))
    if seed:
        with torch.no_grad():
            model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ISTUNE_CACHE", str(tmp_path / "cache"))
    return str(save_model(tmp_path / "model"))


def run(model_dir, items=ITEMS, method="both", batch_size=2, heldout=True):
    model, tokenizer = load_model_and_tokenizer(model_dir)
    counter = ForwardCounter(model)
    cache = ResultCache.for_model(model, model_dir)
    data = InstructionDataset(HELDOUT, tokenizer, 64, train_on_inputs=False) if heldout else None
    result = evaluate_model(model, tokenizer, items, data, CausalLMCollator(tokenizer), method, batch_size, cache)
    return result, counter.calls, cache


def test_second_call_hits_the_cache_without_running_the_model(model_dir):
    first, calls, cache = run(model_dir)
    assert calls > 0 and cache.hits == 0 and cache.misses == 5  # held-out loss + 2 methods x 2 tasks
    second, calls, cache = run(model_dir, batch_size=1)  # batch size is not part of the key
    assert calls == 0 and cache.hits == 5 and cache.misses == 0
    assert second == first


def test_a_change_of_items_or_method_misses(model_dir):
    run(model_dir, method="score")
    changed = {**ITEMS, "piqa": [{**ITEMS["piqa"][0], "options": ["mat", "red"]}, ITEMS["piqa"][1]]}
    _, calls, cache = run(model_dir, items=changed, method="score", heldout=False)
    assert calls > 0 and cache.misses == 1 and cache.hits == 1  # piqa recomputed, boolq from the cache
    _, calls, cache = run(model_dir, method="generate", heldout=False)
    assert calls > 0 and cache.misses == 2 and cache.hits == 0  # generation was never cached


def test_other_weights_or_code_miss(model_dir, tmp_path, monkeypatch):
    run(model_dir, method="score", heldout=False)
    other = str(save_model(tmp_path / "other", seed=1))
    weights = "model.safetensors"
    assert folder_fingerprint(other)["files"][weights] != folder_fingerprint(model_dir)["files"][weights]
    _, calls, cache = run(other, method="score", heldout=False)
    assert calls > 0 and cache.hits == 0
    monkeypatch.setattr(result_cache, "CACHE_VERSION", result_cache.CACHE_VERSION + 1)
    _, calls, cache = run(model_dir, method="score", heldout=False)
    assert calls > 0 and cache.hits == 0


def test_rewritten_weights_of_the_same_shape_miss(model_dir):
    run(model_dir, method="score", heldout=False)
    save_model(model_dir, seed=2)  # same file names and tensor shapes, new values and mtime
    _, calls, cache = run(model_dir, method="score", heldout=False)
    assert calls > 0 and cache.hits == 0


def test_evaluate_base_records_what_train_records(model_dir, capsys):
    """Cached or not, the results have the shape and values of evaluate_tasks and heldout_loss (what `istune train`
    recorded before it used evaluate_model), for the base model (cached) and the tuned one (uncached)."""
    from istune.eval import evaluate_tasks
    from istune.eval.loss import heldout_loss

    model, tokenizer = load_model_and_tokenizer(model_dir)
    data = InstructionDataset(HELDOUT, tokenizer, 64, train_on_inputs=False)
    collate = CausalLMCollator(tokenizer)
    reference = {"heldout_loss": heldout_loss(model, data, collate, 2)}
    for method, summary in evaluate_tasks(model, tokenizer, ITEMS, method=["generate", "score"], batch_size=2,
                                          generation_batch_size=32).items():
        reference[method] = {"tasks": {t: s["accuracy"] for t, s in summary["tasks"].items()},
                             "average": summary["average"]}
    assert evaluate_model(model, tokenizer, ITEMS, data, collate, "both", 2, generation_batch_size=32) == reference
    outputs = []
    for _ in range(2):  # computed, then from the cache
        base = evaluate_base(model, tokenizer, ITEMS, data, collate, method="both", batch_size=2, model_name=model_dir)
        assert base == reference
        outputs.append(capsys.readouterr().out)
    assert "0 of 5 parts from the cache" in outputs[0]
    assert "5 of 5 parts from the cache" in outputs[1]


def test_model_without_local_files_gets_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_model("llama", 40)
    assert ResultCache.for_model(model, "no-such-org/no-such-model") is None
