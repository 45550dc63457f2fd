"""A VLM's vision tower as part of the selection (``ISTConfig.towers="select"``): its blocks come first, then
the language model's layers; every rule trains exactly its selection among them, eq. 8 is exact on the vision
blocks, and ``"train"`` (the default) is what it always was. Tiny random Llava, Mllama and Qwen2.5-VL, with images."""

import logging

import pytest
import torch
import transformers as tf

from istune import ISTConfig, SparseTuner, find_adapter_layers
from istune.core.suppress import suppress_adapters, suppress_layers

from ..tiny_models import peft_model
from .test_layers_architectures import _TEXT, _VISION, _lora, _mllama
from .test_layers_architectures import _batch as _mllama_batch

IMAGE_TOKEN, VISION_START, VISION_END = 99, 97, 98


def _llava():
    """Llava taking the last vision layer's features (its default, -2, leaves the last CLIP layer out of the loss)."""
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_VISION), text_config=tf.LlamaConfig(**_TEXT),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1))


def _qwen2_5_vl():
    """2 vision blocks and a merger (LoRA outside the blocks: it trains at every step), 3 text layers."""
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [1],
              "window_size": 56}
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
        text_config={**_TEXT, "rope_parameters": rope}, vision_config=vision, image_token_id=IMAGE_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END))


# name: (builder, the tower's block lists under the peft wrapper, with their lengths)
VLMS = {
    "llava": (_llava, [("base_model.model.model.vision_tower.encoder.layers", 2)]),
    "mllama": (_mllama, [("base_model.model.model.vision_model.transformer.layers", 2),
                         ("base_model.model.model.vision_model.global_transformer.layers", 1)]),
    "qwen2_5_vl": (_qwen2_5_vl, [("base_model.model.model.visual.blocks", 2)]),
}
LANGUAGE = {"llava": "base_model.model.model.language_model.layers",
            "mllama": "base_model.model.model.language_model.layers",
            "qwen2_5_vl": "base_model.model.model.language_model.layers"}


def _model(name, target_modules="all-linear"):
    torch.manual_seed(0)
    model = VLMS[name][0]()
    if name == "mllama":  # its cross-attention gates start at 0 (tanh(0): the image unseen); open them
        for layer in model.model.language_model.layers:
            for gate in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, gate):
                    getattr(layer, gate).data.fill_(1.0)
    return _lora(model, target_modules)


def _vision_blocks(name) -> int:
    return sum(length for _, length in VLMS[name][1])


def _batch(model, seed):
    """Token ids and labels with one tiny image per row, its placeholders in the text."""
    base = model.get_base_model()
    if isinstance(base, tf.MllamaForConditionalGeneration):
        return _mllama_batch(model, seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 8), generator=generator)
    if isinstance(base, tf.LlavaForConditionalGeneration):
        ids[:, 1:5] = IMAGE_TOKEN  # (28 / 14)^2 patches, the CLS feature dropped
        return {"input_ids": ids, "labels": ids, "pixel_values": torch.randn(2, 3, 28, 28, generator=generator)}
    ids[:, 1:4] = torch.tensor([VISION_START, IMAGE_TOKEN, VISION_END])  # 2 x 2 patches merged into 1 token
    return {"input_ids": ids, "labels": ids, "pixel_values": torch.randn(8, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]])}


@pytest.mark.parametrize("name", sorted(VLMS))
def test_select_puts_the_towers_blocks_first_then_the_language_models_layers(name):
    model = _model(name)
    layers = find_adapter_layers(model, towers="select")
    towers = [f"{path}.{j}" for path, length in VLMS[name][1] for j in range(length)]
    language = [f"{LANGUAGE[name]}.{j}" for j in range(_TEXT["num_hidden_layers"])]
    assert [layer.name for layer in layers] == towers + language  # N_L = V + L, in data-flow order
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert all(layer.adapters for layer in layers)
    assert [layer.name for layer in find_adapter_layers(model)] == language  # "train": as before
    assert [layer.name for layer in find_adapter_layers(model, towers="train")] == language


RULES = {
    "ist": dict(strategy="ist", update_layers=1, probe_interval=2),
    "random": dict(strategy="random", update_layers=2),
    "badam": dict(strategy="badam", update_layers=2),
    "fixed": dict(strategy="fixed", layers=[1, 3]),  # a vision block and a language layer
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("name", sorted(VLMS))
def test_only_the_selected_blocks_change_vision_blocks_included(name, rule):
    model = _model(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tuner = SparseTuner(model, ISTConfig(**RULES[rule], towers="select"), optimizer=optimizer)
    vision = _vision_blocks(name)
    assert tuner.num_layers == vision + _TEXT["num_hidden_layers"]
    trained = set()
    for step in range(4):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        model(**_batch(model, step)).loss.backward()
        for j, layer in enumerate(tuner.layers):  # a gradient reached each selected block, none other
            gradients = [p.grad for p in layer.parameters]
            assert all(g is not None and g.abs().sum() > 0 for g in gradients) if j in selected else \
                all(g is None for g in gradients), f"step {step}: layer {j}, selected {selected}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(model, 100 + step))
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert all(moved) if j in selected else not any(moved), f"step {step}: layer {j}, selected {selected}"
        trained |= set(selected)
    assert trained & set(range(vision)) and trained - set(range(vision))  # (seeded) both kinds trained
    if rule == "ist":
        assert tuner.importance.abs().sum() > 0  # two importance updates, their probes suppressing vision blocks
    tuner.close()


def test_badams_ascending_order_starts_with_the_vision_blocks():
    model = _model("mllama")  # 3 vision blocks (2 local + 1 global), 3 language layers
    tuner = SparseTuner(model, ISTConfig(strategy="badam", update_layers=2, towers="select"))
    selections = []
    for _ in range(4):
        selections.append(tuner.begin_step())
        tuner.end_step()
    assert selections == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert [tuner.layers[j].name.removeprefix("base_model.model.model.") for j in selections[1]] == [
        "vision_model.global_transformer.layers.0", "language_model.layers.0"]
    tuner.close()


def _adapters_off(modules):
    """The adapter modules' own switch off (peft's ``enable_adapters(False)``): their base layers' outputs."""
    class Off:
        def __enter__(self):
            for module in modules:
                module.enable_adapters(False)

        def __exit__(self, *_):
            for module in modules:
                module.enable_adapters(True)
    return Off()


@pytest.mark.parametrize("name", sorted(VLMS))
def test_beta_zero_on_the_vision_blocks_gives_them_their_base_output(name):
    model = _model(name).eval()
    layers = find_adapter_layers(model, towers="select")
    vision = layers[:_vision_blocks(name)]
    modules = [m for layer in vision for m in layer.adapters]
    batch = {key: value for key, value in _batch(model, 0).items() if key != "labels"}
    with torch.no_grad():
        adapted = model(**batch).logits
        with suppress_layers(vision, 0.0):
            suppressed = model(**batch).logits
        with _adapters_off(modules):
            base = model(**batch).logits
        with suppress_layers(layers, 0.0), model.disable_adapter():  # every layer at β = 0, the rest off: the base
            all_suppressed = model(**batch).logits
        with model.disable_adapter():
            base_model = model(**batch).logits
    assert not torch.allclose(adapted, base)  # the vision blocks' adapters change the output
    torch.testing.assert_close(suppressed, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_suppressed, base_model, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(VLMS))
def test_each_suppressed_vision_module_equals_direct_computation(name):
    model = _model(name).eval()
    layers = find_adapter_layers(model, towers="select")
    modules = [m for layer in layers[:_vision_blocks(name)] for m in layer.adapters]
    inputs = {}

    def record(module, args, output):
        inputs[id(module)] = args[0].detach()

    hooks = [m.register_forward_hook(record) for m in modules]
    with torch.no_grad():
        model(**{key: value for key, value in _batch(model, 0).items() if key != "labels"})
    for hook in hooks:
        hook.remove()
    beta = 0.25
    with torch.no_grad():
        for module in modules:
            x = inputs[id(module)]
            adapted, base = module(x), module.base_layer(x)
            assert not torch.allclose(adapted, base)
            with suppress_adapters([module], beta):
                suppressed = module(x)
            torch.testing.assert_close(suppressed, base + beta * (adapted - base), rtol=1e-5, atol=1e-6)


def test_a_probe_without_the_vision_blocks_at_beta_zero_measures_the_base_vision_tower():
    model = _model("qwen2_5_vl")
    tuner = SparseTuner(model, ISTConfig(strategy="ist", towers="select", beta=0.0))
    vision = _vision_blocks("qwen2_5_vl")
    batch = _batch(model, 3)
    language_only = list(range(vision, tuner.num_layers))
    loss = tuner.probe_losses(batch, [language_only])[0]
    model.eval()
    with torch.no_grad(), _adapters_off([m for layer in tuner.layers[:vision] for m in layer.adapters]):
        expected = model(**batch).loss
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    tuner.close()


def test_a_trainable_projector_gets_its_gradient_under_gradient_checkpointing():
    """The language layers below the lowest selected one run without autograd only when nothing trainable feeds
    them: the projector between the vision blocks (no trainable input) and them does. Same gradients as without."""
    gradients = []
    for checkpointing in (False, True):
        model = _model("llava")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # the patch and token embeddings' outputs require grad
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[3], towers="select"))
        tuner.begin_step()  # lowest selected: language layer 1; the vision blocks and language layer 0 below it
        model(**_batch(model, 0)).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        tuner.close()
    plain, checkpointed = gradients
    projector = [n for n in plain if "multi_modal_projector" in n]
    assert projector and set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("towers", [None, "train"])
def test_train_names_the_vision_tower_once_and_selects_among_the_language_layers(caplog, towers):
    model = _model("mllama")
    options = {} if towers is None else {"towers": towers}
    with caplog.at_level(logging.INFO, logger="istune"):
        tuner = SparseTuner(model, ISTConfig(strategy="random", update_layers=1, **options))
    assert [layer.name for layer in tuner.layers] == [f"{LANGUAGE['mllama']}.{j}" for j in range(3)]
    tower = [r.message for r in caplog.records if "vision tower" in r.message]
    assert len(tower) == 1 and "train at every step, outside the selection" in tower[0]
    assert "join the selection" not in caplog.text
    tuner.close()


def test_select_says_once_where_the_vision_blocks_are_and_what_trains_outside_them(caplog):
    model = _model("qwen2_5_vl")
    with caplog.at_level(logging.INFO, logger="istune"):
        SparseTuner(model, ISTConfig(strategy="random", update_layers=1, towers="select")).close()
    tower = [r.message for r in caplog.records if "vision tower" in r.message]
    assert tower == [
        "IST: the vision tower's 2 blocks that hold adapters ('base_model.model.model.visual') join the selection: "
        "positions 0-1 of the N_L = 5 layers IST chooses among.",
        "IST: the vision tower's adapters outside its blocks ('base_model.model.model.visual': "
        "merger.mlp.0.lora_A.default.weight, merger.mlp.0.lora_B.default.weight, merger.mlp.2.lora_A.default.weight, "
        "...) train at every step, outside the selection."]


# ---- refused, with the reason ----------------------------------------------------------------------


def test_select_on_a_text_model_is_refused():
    model = peft_model("llama", "lora", num_layers=2)
    with pytest.raises(ValueError, match=r"ISTConfig.towers='select' asks for a vision or audio tower's "
                                         r"blocks .* but LlamaForCausalLM has none .* use towers='train'"):
        SparseTuner(model, ISTConfig(towers="select"))
    assert len(SparseTuner(model, ISTConfig(towers="train")).layers) == 2


def test_select_without_adapters_in_the_tower_is_refused():
    model = _model("mllama", target_modules=r".*language_model.*\.(q_proj|v_proj)")
    message = (r"ISTConfig.towers='select': no block of the vision tower \('base_model.model.model."
               r"vision_model'\) holds a trainable parameter \(its block lists: '.*transformer.layers' \(2x "
               r"MllamaVisionEncoderLayer, 0 adapters\), '.*global_transformer.layers' \(1x MllamaVisionEncoderLayer, "
               r"0 adapters\)\)\. Put adapters on the tower's blocks")
    with pytest.raises(ValueError, match=message):
        find_adapter_layers(model, towers="select")


def test_select_with_adapters_in_the_tower_only_selects_among_its_blocks():
    model = _model("mllama", target_modules=r".*vision_model.*\.(q_proj|v_proj)")
    layers = find_adapter_layers(model, towers="select")
    assert [layer.name.removeprefix("base_model.model.model.") for layer in layers] == [
        "vision_model.transformer.layers.0", "vision_model.transformer.layers.1",
        "vision_model.global_transformer.layers.0"]


def test_layers_path_inside_the_tower_is_refused_with_select():
    model = _model("llava")
    inside = "base_model.model.model.vision_tower.encoder.layers"
    with pytest.raises(ValueError, match=rf"ISTConfig.layers_path='{inside}' names a list inside the vision tower"):
        find_adapter_layers(model, layers_path=inside, towers="select")
