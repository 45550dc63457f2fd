"""Every PEFT method under IST, on tiny models of several families: one table, parametrized checks.

The paper's methods (LoRA, DoRA, AdaLoRA, series and parallel bottleneck adapters) and
full-layer tuning (LISA-style), each with strategy 'all' and 'ist': exactly the selected
layers change, suppression is exact (eq. 8), adapters survive a save/load round trip and
merged weights give the unmerged outputs. Then the other peft tuners: each is suppressed
exactly, or refused with a clear error before training.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from istune import ISTConfig, SparseTuner
from istune.adapters import add_paper_bottleneck_adapters, load_bottleneck_adapters, save_bottleneck_adapters
from istune.core.layers import find_adapter_layers, prepare_full_layer_tuning
from istune.core.suppress import prepare_suppression, suppress_adapters, suppress_layers
from istune.integrations import adalora

from ..tiny_models import CORE_FAMILIES, peft_model, tiny_model

NUM_LAYERS = 4
PAPER_METHODS = ["lora", "dora", "adalora", "series", "parallel", "full"]
PEFT_METHODS = ["lora", "dora", "adalora"]


def build(method: str, family: str) -> torch.nn.Module:
    """A tiny model of ``family`` with ``method`` in every layer; adapters start away from identity."""
    if method in PEFT_METHODS:
        return peft_model(family, method, num_layers=NUM_LAYERS)
    if method in TUNERS:
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_model(family, num_layers=NUM_LAYERS), TUNERS[method][family]()).train()
    model = tiny_model(family, num_layers=NUM_LAYERS)
    torch.manual_seed(1)
    if method in ("series", "parallel"):
        return add_paper_bottleneck_adapters(model, method, bottleneck_size=8, init="bert").train()
    return prepare_full_layer_tuning(model).train()


def _batch(seed: int) -> dict:
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _logits(model, seed: int = 7) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_batch(seed)["input_ids"]).logits


def train(model, strategy: str, steps: int = 3, on_step=None) -> SparseTuner:
    """Train with SparseTuner in a plain loop; ``on_step(tuner, selected, before)`` checks each step."""
    # Weight decay moves every parameter that has a gradient: only grad=None keeps one still.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    config = ISTConfig(strategy=strategy, **({"update_layers": 2, "probe_interval": 1} if strategy == "ist" else {}))
    tuner = SparseTuner(model, config, optimizer=optimizer)
    for step in range(steps):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        model(**_batch(step)).loss.backward()
        if adalora.is_adalora(model):
            adalora.update_and_allocate(model, step)  # what ISTCallback does; no rank is cut before step tinit=2
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(100 + step))
        if on_step is not None:
            on_step(tuner, selected, before)
    tuner.close()
    return tuner


# ---- the paper's methods and full layers ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["all", "ist"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_exactly_the_selected_layers_change(method, family, strategy):
    model = build(method, family)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    steps = []

    def check(tuner, selected, before):
        assert len(selected) == (NUM_LAYERS if strategy == "all" else 2)
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            unchanged = [torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert (not all(unchanged)) if j in selected else all(unchanged), (j, selected)
        steps.append(selected)

    tuner = train(model, strategy, on_step=check)
    assert len(steps) == 3 and tuner.num_layers == NUM_LAYERS
    if strategy == "ist":
        assert sum(e["event"] == "probe" for e in tuner.history) == 3 and tuner.importance.abs().sum() > 0
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"frozen weight {name} changed"


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_suppression_is_exact(method, family):
    model = build(method, family)
    layers = find_adapter_layers(model)
    prepare_suppression(model, layers)  # W0 of full layers: the pretrained weights
    pretrained = _logits(tiny_model(family, num_layers=NUM_LAYERS))
    train(model, "all", steps=2)  # every layer moves away from where it started
    adapted = _logits(model)
    assert not torch.allclose(adapted, pretrained, atol=1e-4), "the method must change the output to test anything"
    with suppress_layers(layers, 0.0):
        torch.testing.assert_close(_logits(model), pretrained, rtol=1e-5, atol=1e-5)  # β=0: the pretrained model
    with suppress_layers(layers, 1.0):
        torch.testing.assert_close(_logits(model), adapted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0)  # restored

    beta, suppressed = 0.25, [layers[0], layers[2]]
    if method == "full":  # the suppressed blocks run with W0 + β(W − W0), the others with W
        reference = copy.deepcopy(model)
        initial = find_adapter_layers(prepare_full_layer_tuning(tiny_model(family, num_layers=NUM_LAYERS)))
        with torch.no_grad():
            for j in (0, 2):
                for p, p0 in zip(find_adapter_layers(reference)[j].parameters, initial[j].parameters):
                    p.copy_(p0 + beta * (p - p0))
        with suppress_layers(suppressed, beta):
            torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-6)
        return
    for module in (m for layer in suppressed for m in layer.adapters):  # each module: base + β(adapted − base)
        x = _module_input(model, module)
        with torch.no_grad():
            full, base = module(x), module.base_layer(x)
            with suppress_adapters([module], beta):
                torch.testing.assert_close(module(x), base + beta * (full - base), rtol=1e-5, atol=1e-6)


def _module_input(model, module) -> torch.Tensor:
    seen = []
    hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    _logits(model)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_save_load_round_trip_after_ist(method, family, tmp_path):
    model = build(method, family)
    train(model, "ist")
    trained = _logits(model)
    fresh = tiny_model(family, num_layers=NUM_LAYERS)
    if method in PEFT_METHODS:
        model.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    elif method in ("series", "parallel"):
        save_bottleneck_adapters(model, tmp_path)
        loaded = load_bottleneck_adapters(fresh, tmp_path)
    else:
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded), trained, rtol=0, atol=0)


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_merged_weights_give_the_unmerged_outputs(method, family):
    model = build(method, family)
    train(model, "ist")
    unmerged = _logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), unmerged, rtol=1e-4, atol=1e-4)  # fp32 rounding


def test_full_layer_preparation_trains_blocks_and_optionally_embeddings():
    model = prepare_full_layer_tuning(tiny_model("llama", num_layers=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{n}" for n in [f"{i}.{k}" for i in range(3) for k, _ in
                                                       model.model.layers[0].named_parameters()]}
    lisa = prepare_full_layer_tuning(tiny_model("llama", num_layers=3), train_embeddings=True, train_head=True)
    extra = {n for n, p in lisa.named_parameters() if p.requires_grad} - trainable
    assert extra == {"model.embed_tokens.weight", "lm_head.weight"}
    with pytest.raises(ValueError, match="without adapters.*adapter modules"):
        prepare_full_layer_tuning(peft_model("llama", "lora"))


def test_full_layer_initial_weights_are_kept_off_the_model():
    model = build("full", "gpt2")
    layers = find_adapter_layers(model)
    prepare_suppression(model, layers)
    assert all(layer.initial is not None and len(layer.initial) == len(layer.parameters) for layer in layers)
    for layer in layers:
        for p, p0 in zip(layer.parameters, layer.initial):
            assert torch.equal(p, p0) and p0.data_ptr() != p.data_ptr() and p0.device.type == "cpu"
    with pytest.raises(RuntimeError, match="no_grad"):
        with suppress_layers(layers, 0.25):
            model(**_batch(0))
    assert all(torch.equal(p, p0) for layer in layers for p, p0 in zip(layer.parameters, layer.initial))


# ---- the other peft tuners ---------------------------------------------------------------------------

_LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
_GPT2_TARGETS = ["c_attn", "c_fc", "mlp.c_proj"]

# Tuner -> family -> config. peft's own tuners that accept GPT-2's Conv1D also run on GPT-2.
TUNERS = {
    "ia3": {"llama": lambda: peft.IA3Config(target_modules=_LLAMA_TARGETS, feedforward_modules=["down_proj"]),
            "gpt2": lambda: peft.IA3Config(target_modules=_GPT2_TARGETS, feedforward_modules=["mlp.c_proj"],
                                           fan_in_fan_out=True)},
    "loha": {"llama": lambda: peft.LoHaConfig(r=4, target_modules=_LLAMA_TARGETS)},
    "lokr": {"llama": lambda: peft.LoKrConfig(r=4, target_modules=_LLAMA_TARGETS)},
    "vera": {"llama": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
             "gpt2": lambda: peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)},
    "fourierft": {"llama": lambda: peft.FourierFTConfig(n_frequency=50, target_modules=_LLAMA_TARGETS),
                  "gpt2": lambda: peft.FourierFTConfig(n_frequency=50, target_modules=_GPT2_TARGETS,
                                                       fan_in_fan_out=True)},
    "oft": {"llama": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=_LLAMA_TARGETS)},
    "boft": {"llama": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=_LLAMA_TARGETS)},
    "hra": {"llama": lambda: peft.HRAConfig(r=4, target_modules=_LLAMA_TARGETS)},
    "ln_tuning": {"llama": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
                  "gpt2": lambda: peft.LNTuningConfig(target_modules=["ln_1", "ln_2"])},
}
# Newer peft tuners, LLaMA only: the same generic path, checked the same way.
TUNERS.update({name: {"llama": (lambda make=make: make(target_modules=_LLAMA_TARGETS))} for name, make in {
    "c3a": lambda **kw: peft.C3AConfig(block_size=16, **kw),
    "delora": lambda **kw: peft.DeloraConfig(r=4, **kw),
    "gralora": lambda **kw: peft.GraloraConfig(r=4, **kw),
    "miss": lambda **kw: peft.MissConfig(r=4, **kw),
    "osf": lambda **kw: peft.OSFConfig(**kw),
    "randlora": lambda **kw: peft.RandLoraConfig(r=4, **kw),
    "road": lambda **kw: peft.RoadConfig(group_size=8, **kw),
    "shira": lambda **kw: peft.ShiraConfig(r=2, **kw),
    "waveft": lambda **kw: peft.WaveFTConfig(n_frequency=50, **kw),
}.items()})
TUNER_CASES = [(name, family) for name, families in TUNERS.items() for family in families]
MERGE_SKIP = {"ln_tuning"}  # peft's LN tuning "merge" swaps in the tuned copy; nothing to compare


def _perturbed(name: str, family: str) -> torch.nn.Module:
    """The tuner's model with every trainable parameter moved off its (often identity) init."""
    model = build(name, family)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name, family", TUNER_CASES)
def test_tuner_is_suppressed_exactly(name, family):
    model = _perturbed(name, family)
    layers = find_adapter_layers(model)
    prepare_suppression(model, layers)  # no refusal
    pretrained, adapted = _logits(tiny_model(family, num_layers=NUM_LAYERS)), _logits(model)
    assert not torch.allclose(adapted, pretrained, atol=1e-4)
    with suppress_layers(layers, 0.0):
        torch.testing.assert_close(_logits(model), pretrained, rtol=1e-5, atol=1e-5)
    with suppress_layers(layers, 1.0):
        torch.testing.assert_close(_logits(model), adapted, rtol=1e-6, atol=1e-6)
    module = layers[1].adapters[0]
    x = _module_input(model, module)
    with torch.no_grad():
        full, base = module(x), module.base_layer(x)
        with suppress_layers([layers[1]], 0.25):
            torch.testing.assert_close(module(x), base + 0.25 * (full - base), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, family", TUNER_CASES)
def test_tuner_trains_exactly_the_selected_layers_with_ist(name, family):
    model = _perturbed(name, family)

    def check(tuner, selected, before):
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            unchanged = [torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert (not all(unchanged)) if j in selected else all(unchanged)

    train(model, "ist", steps=2, on_step=check)
    if name not in MERGE_SKIP:
        unmerged = _logits(model)
        torch.testing.assert_close(_logits(model.merge_and_unload()), unmerged, rtol=1e-4, atol=1e-4)


# Tuners and settings refused before training, and where: find_adapter_layers (any strategy)
# or prepare_suppression (strategy 'ist' only).
REFUSED = {
    "prompt_tuning": ("find", "Prompt-based tuners", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))),
    "prefix_tuning": ("find", "Prompt-based tuners", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))),
    "p_tuning": ("find", "Prompt-based tuners", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))),
    "multitask_prompt_tuning": ("find", "Prompt-based tuners", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.MultitaskPromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))),
    "cpt": ("find", "Prompt-based tuners", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.CPTConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))),
    "vblora": ("find", "shared by several decoder layers.*vblora_vector_bank", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.VBLoRAConfig(vector_length=8, num_vectors=16, target_modules=["q_proj"]))),
    "lily": ("find", "shared by several decoder layers.*lily_", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.LilyConfig(target_modules=["q_proj", "v_proj"]))),
    "tinylora": ("find", "shared by several decoder layers.*tinylora_", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.TinyLoraConfig(target_modules=["q_proj", "v_proj"]))),
    "unilora": ("find", "shared by several decoder layers.*unilora_", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.UniLoraConfig(target_modules=["q_proj", "v_proj"]))),
    "lora_bias_all": ("ist", r"outside its adapters \(.*bias", lambda: peft.get_peft_model(
        tiny_model("opt"), peft.LoraConfig(target_modules=["q_proj"], bias="all"))),
    "lora_modules_to_save_in_layers": ("ist", "outside its adapters.*modules_to_save", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["input_layernorm"]))),
    "modules_to_save_only": ("ist", "belong to peft modules that are not tuner layers", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(target_modules=["lm_head"], modules_to_save=["input_layernorm"]))),
    "lora_pissa": ("ist", "init_lora_weights='pissa'", lambda: peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_tuner_is_refused_with_a_clear_error(name):
    where, message, make = REFUSED[name]
    model = make()
    if where == "find":
        with pytest.raises(ValueError, match=message):
            find_adapter_layers(model)
        return
    layers = find_adapter_layers(model)
    with pytest.raises(ValueError, match=f"IST's probes cannot suppress.*{message}.*'random'"):
        prepare_suppression(model, layers)
    with pytest.raises(ValueError, match=message):
        SparseTuner(model, ISTConfig(strategy="ist"))
    SparseTuner(model, ISTConfig(strategy="random")).close()  # no suppression needed: accepted


def test_full_layer_initial_weights_can_come_from_the_starting_state_dict():
    pretrained = tiny_model("llama", num_layers=NUM_LAYERS)
    resumed = build("full", "llama")
    train(resumed, "all", steps=1)  # as if resumed from a checkpoint: the weights have moved
    layers = find_adapter_layers(resumed)
    prepare_suppression(resumed, layers, initial_state=pretrained.state_dict())
    with suppress_layers(layers, 0.0):
        torch.testing.assert_close(_logits(resumed), _logits(pretrained), rtol=1e-5, atol=1e-5)
    fresh = build("full", "llama")
    with pytest.raises(ValueError, match="initial_state has no weight 'model.layers.0.self_attn.q_proj.weight'"):
        prepare_suppression(fresh, find_adapter_layers(fresh), initial_state={})
