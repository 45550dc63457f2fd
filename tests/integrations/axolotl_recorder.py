"""An axolotl plugin for tests/integrations/test_axolotl.py: records what each training step changed.

Listed after ISTPlugin under ``plugins:`` in the test's config, it adds a callback that writes
``recorded.json`` to the output folder when training ends:

* ``changed``: per optimizer step (1-based), the decoder layers whose LoRA weights moved;
* ``losses``: when axolotl's fused LoRA kernels patched the attention, the loss of one fixed batch
  through the kernels and through peft's own modules (axolotl's fallbacks), each with every adapter
  at full response and suppressed by β (istune's eq. 8), after training, with the LoRA weights set to
  fixed random values first (so that β's effect on the loss is large and the same in every run).
"""

from __future__ import annotations

import json
import os

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from istune.core import suppress_adapters
from istune.core.layers import is_adapter_module, layer_list

BETA = 0.25


class StepRecorder(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [RecordingCallback()]


class RecordingCallback(TrainerCallback):
    def __init__(self):
        self.before: dict[int, list[torch.Tensor]] = {}
        self.changed: dict[int, list[int]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {i: [p.detach().clone() for p in ps] for i, ps in enumerate(lora_weights(model))}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed[state.global_step] = [
            i for i, ps in enumerate(lora_weights(model))
            if any(not torch.equal(p.detach(), old) for p, old in zip(ps, self.before[i]))]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        record = {"changed": self.changed, "losses": kernel_and_peft_losses(model)}
        with open(os.path.join(args.output_dir, "recorded.json"), "w", encoding="utf-8") as file:
            json.dump(record, file)


def blocks(model) -> list[torch.nn.Module]:
    return list(layer_list(model)[1])


def lora_weights(model) -> list[list[torch.nn.Parameter]]:
    return [[p for name, p in block.named_parameters() if "lora_" in name] for block in blocks(model)]


def kernel_and_peft_losses(model) -> dict | None:
    """The loss of one batch through the kernels and through peft's modules, full and suppressed; None unpatched."""
    from axolotl.kernels.lora import apply_lora_o, apply_lora_qkv
    from axolotl.monkeypatch.lora_kernels import original_apply_o, original_apply_qkv

    attentions = [block.self_attn for block in blocks(model)]
    if not all(getattr(getattr(a, "apply_qkv", None), "__func__", None) is apply_lora_qkv for a in attentions):
        return None
    assert all(a.apply_o.__func__ is apply_lora_o for a in attentions)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=generator)
    suppressed = [m for block in blocks(model) for m in block.modules() if is_adapter_module(m)]
    with torch.no_grad():  # after 6 steps of one layer each, B is near 0 and β's effect small and run-dependent
        for weights in lora_weights(model):
            for weight in weights:
                weight.copy_(0.1 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))

    def losses() -> dict[str, float]:
        with torch.no_grad():
            full = model(input_ids=input_ids, labels=input_ids).loss.item()
            with suppress_adapters(suppressed, BETA):
                low = model(input_ids=input_ids, labels=input_ids).loss.item()
        return {"full": full, "suppressed": low}

    was_training = model.training
    model.eval()
    through_kernels = losses()
    for attention in attentions:  # axolotl's own fallbacks: q_proj(x), ... through peft's LoRA forward
        attention.apply_qkv = original_apply_qkv.__get__(attention)
        attention.apply_o = original_apply_o.__get__(attention)
    through_peft = losses()
    for attention in attentions:
        attention.apply_qkv = apply_lora_qkv.__get__(attention)
        attention.apply_o = apply_lora_o.__get__(attention)
    model.train(was_training)
    return {"kernels": through_kernels, "peft": through_peft}
