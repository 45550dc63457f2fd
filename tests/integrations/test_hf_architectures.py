"""A VLM (text-only data) and a MoE model through a transformers Trainer with `add_ist`: IST finds the language
model's layers and trains exactly its selection (issue 33, item 4); a VLM with images and `towers="select"`:
its vision blocks join the selection."""

import peft
import pytest
import torch
import transformers as tf

from istune import ISTConfig, add_ist

from ..core.test_layers_architectures import _llava
from ..core.test_towers import _batch as _image_batch
from ..core.test_towers import _model as _vlm
from .test_hf import ParameterWatcher, TokenDataset, _args


def _qwen3_moe():
    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))


MODELS = {"llava (VLM, text-only batches)": (_llava, 3), "qwen3-moe": (_qwen3_moe, 3)}


@pytest.mark.parametrize("name", MODELS)
def test_add_ist_trains_exactly_the_selection_of_the_language_model(tmp_path, name):
    build, num_layers = MODELS[name]
    torch.manual_seed(0)
    model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))
    trainer = tf.Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=TokenDataset())
    ist = add_ist(trainer, ISTConfig(strategy="ist", update_layers=1, probe_interval=2))
    watcher = ParameterWatcher(ist)
    trainer.add_callback(watcher)
    trainer.train()
    assert watcher.steps == 4 and len(ist.tuner.layers) == num_layers
    assert all(".language_model." in layer.name or ".model.layers." in layer.name for layer in ist.tuner.layers)
    assert ist.importance.abs().sum() > 0  # two importance updates ran, with probes through the whole model


class ImageTextDataset(torch.utils.data.Dataset):
    """Rows of token ids with an image's placeholders, and the image (Llava: 3 x 28 x 28)."""

    def __init__(self, model, size=16):
        batches = [_image_batch(model, seed) for seed in range(size // 2)]
        self.rows = [{key: batch[key][row] for key in ("input_ids", "labels", "pixel_values")}
                     for batch in batches for row in range(2)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class SelectionWatcher(ParameterWatcher):
    """ParameterWatcher that also keeps every step's selection."""

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        self.selections = [*getattr(self, "selections", []), self.selected]


def test_add_ist_with_towers_select_trains_exactly_the_selection_vision_blocks_included(tmp_path):
    model = _vlm("llava")
    trainer = tf.Trainer(model=model, args=_args(tmp_path, max_steps=6, per_device_train_batch_size=2),
                         train_dataset=ImageTextDataset(model))
    ist = add_ist(trainer, ISTConfig(strategy="ist", update_layers=2, probe_interval=2, towers="select"))
    watcher = SelectionWatcher(ist)
    trainer.add_callback(watcher)
    trainer.train()
    names = [layer.name for layer in ist.tuner.layers]
    assert watcher.steps == 6 and len(names) == 2 + 3
    assert all(".vision_tower." in name for name in names[:2]) and all(".language_model." in n for n in names[2:])
    trained = {j for selected in watcher.selections for j in selected}
    assert trained & {0, 1}  # (seeded) a vision block was selected, and trained (the watcher checks)
    assert ist.importance.abs().sum() > 0
