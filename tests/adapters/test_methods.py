"""istune.adapters.methods: adding peft's methods without peft's own deprecation warning, saving and loading back."""

import warnings

import pytest
import torch

from istune.adapters.methods import AdapterArgs, add_adapters, load_adapters, quiet_peft_wrapping, save_adapters

from ..tiny_models import tiny_model


def _warnings_of(action) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = action()
    return result, [str(w.message) for w in seen]


def test_peft_wrapping_is_quiet_but_other_warnings_pass(tmp_path):
    import peft

    lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
    _, raw = _warnings_of(lambda: peft.get_peft_model(tiny_model("llama"), lora))
    if not any("is_gradient_checkpointing" in m for m in raw):
        pytest.skip("this peft/transformers pair raises no is_gradient_checkpointing warning: nothing to hide")
    args = AdapterArgs(method="lora", rank=4, alpha=8)

    def add_save_load():
        model = add_adapters(tiny_model("llama"), args, total_steps=10)
        save_adapters(model, tmp_path / "adapter", args)
        with quiet_peft_wrapping():
            warnings.warn("some other change", FutureWarning, stacklevel=1)
        return model, load_adapters(tiny_model("llama"), tmp_path / "adapter")

    (model, loaded), messages = _warnings_of(add_save_load)
    assert not any("is_gradient_checkpointing" in m for m in messages), messages
    assert "some other change" in messages
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert trained and all(torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in trained.items())
