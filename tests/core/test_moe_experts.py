"""LoRA on MoE experts: fused 3-D expert parameters (peft ``target_parameters``) and unfused expert linears
(``target_modules``) train only in the selected layers under every rule, and eq. 8 suppresses them exactly.

transformers 5 stores the routed experts of Mixtral, Qwen3-MoE, GPT-OSS, OLMoE and DeepSeek-V3 as two fused
parameters per layer, ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` (experts x in x out); peft wraps
each in a ``ParamWrapper`` that adds ``scaling · ΔW`` to the weight at every forward. DeepSeek-V3's shared experts
and Llama 4's are plain linears (``mlp.shared_experts.gate_proj`` ...; peft retargets DeepSeek's, see the last test).
"""

import peft
import pytest
import torch
import transformers as tf

from istune import ISTConfig, SparseTuner, find_adapter_layers
from istune.core.rules import BUILT_IN_NAMES
from istune.core.suppress import suppress_adapters

from .test_rules import RULE_CONFIGS

NUM_LAYERS = 3
FUSED = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHARED = ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
LLAMA4_FUSED = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
LLAMA4_SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
_TEXT = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": NUM_LAYERS,
         "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_EXPERTS = {"num_experts_per_tok": 2}

MOE_CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(**_TEXT, **_EXPERTS, num_local_experts=4),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_TEXT, **_EXPERTS, num_experts=4, moe_intermediate_size=16, head_dim=8),
    "gpt_oss": lambda: tf.GptOssConfig(**_TEXT, **_EXPERTS, num_local_experts=4, head_dim=8),
    "olmoe": lambda: tf.OlmoeConfig(**_TEXT, **_EXPERTS, num_experts=4),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **_TEXT, **_EXPERTS, n_routed_experts=4, moe_intermediate_size=16, n_group=1, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8),
}
# Llama 4 (not converted by peft, see the last test) has a shared expert of nn.Linear beside its fused experts.
LLAMA4 = lambda: tf.Llama4TextConfig(  # noqa: E731
    **{**_TEXT, "intermediate_size": 16}, num_experts_per_tok=1, num_local_experts=4, intermediate_size_mlp=64,
    head_dim=8, interleave_moe_layer_step=1)


def _moe(name, target_parameters=FUSED, target_modules=()):
    """A tiny random MoE model with LoRA (B randomised, so it changes the output) on its experts, in train mode."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(LLAMA4() if name == "llama4_text" else MOE_CONFIGS[name]())
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                             target_parameters=list(target_parameters), init_lora_weights=False)
    return peft.get_peft_model(model, config).train()


def _batch(seed):
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _train(model, config, steps):
    """``steps`` steps of the plain loop; asserts after each that exactly the selected layers' adapters moved."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tuner = SparseTuner(model, config, optimizer=optimizer, probe_batches=lambda: _batch(500 + tuner.step))
    selections = []
    for _ in range(steps):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        model(**_batch(tuner.step)).loss.backward()
        tuner.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(100 + tuner.step))
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert all(moved) if j in selected else not any(moved), (config.strategy, tuner.step, j, selected)
        selections.append(selected)
    tuner.close()
    return selections


def _assert_suppression_is_exact(model):
    """β = 0 gives the model with adapters off, β = 1 the adapted model, to 1e-6; the adapters matter."""
    modules = [m for layer in find_adapter_layers(model) for m in layer.adapters]
    ids = _batch(7)["input_ids"]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with suppress_adapters(modules, 0.0):
            off = model(input_ids=ids).logits
        with suppress_adapters(modules, 1.0):
            on = model(input_ids=ids).logits
    model.train()
    assert (adapted - base).abs().max() > 1e-3, "the expert adapters must change the output for the test to mean much"
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(on, adapted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_fused_experts_get_one_adapter_per_parameter_in_every_layer(name):
    model = _moe(name)
    layers = find_adapter_layers(model)
    assert [layer.index for layer in layers] == list(range(NUM_LAYERS))
    for layer in layers:
        wrappers = [m for m in layer.adapters if isinstance(m, peft.tuners.lora.ParamWrapper)]
        assert sorted(m.parameter_name for m in wrappers) == ["down_proj", "gate_up_proj"]
        assert wrappers[0].num_experts == 4
        assert all("lora_" in n for n in layer.parameter_names)


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_ist_trains_only_the_selected_layers_experts_and_suppression_is_exact(name):
    model = _moe(name)
    _assert_suppression_is_exact(model)
    selections = _train(model, ISTConfig(strategy="ist", update_layers=1, probe_interval=2, seed=3), 4)
    assert all(len(s) == 1 for s in selections)
    _assert_suppression_is_exact(model)  # after training too


@pytest.mark.parametrize("strategy", BUILT_IN_NAMES)
def test_every_rule_trains_only_the_selected_layers_experts(strategy):
    settings = {**RULE_CONFIGS.get(strategy, {"update_layers": 1}), "seed": 7}
    if "update_layers" in settings:
        settings["update_layers"] = 1
    if strategy == "fixed":
        settings["layers"] = [0, 2]
    selections = _train(_moe("qwen3_moe"), ISTConfig(strategy=strategy, **settings), 4)
    expected = {"all": [0, 1, 2], "fixed": [0, 2]}.get(strategy)
    assert all(sorted(s) == expected for s in selections) if expected else all(len(s) == 1 for s in selections)


def test_unfused_shared_expert_linears_beside_fused_routed_experts():
    """Llama 4: the shared expert is nn.Linear (target_modules), the routed experts fused (target_parameters)."""
    model = _moe("llama4_text", target_parameters=LLAMA4_FUSED, target_modules=LLAMA4_SHARED)
    for layer in find_adapter_layers(model):
        assert sorted(type(m).__name__ for m in layer.adapters) == ["Linear"] * 3 + ["ParamWrapper"] * 2
    _assert_suppression_is_exact(model)
    _train(model, ISTConfig(strategy="ist", update_layers=1, probe_interval=1, seed=3), 3)
    _assert_suppression_is_exact(model)


def test_peft_takes_gate_up_down_proj_names_for_the_fused_experts_on_converted_moe_types():
    """peft (0.21) rewrites target_modules for the MoE types whose checkpoints transformers 5 converts (Mixtral,
    Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ...): a name ending in gate_proj/up_proj/down_proj, like DeepSeek-V3's shared
    experts', becomes the fused routed experts' target_parameters, so the shared experts get no adapter (nor do
    DeepSeek's dense first layers under "all-linear"). docs/models.md says so; this test notices when peft changes."""
    model = _moe("deepseek_v3", target_parameters=(), target_modules=SHARED)
    for layer in find_adapter_layers(model):
        assert sorted(type(m).__name__ for m in layer.adapters) == ["ParamWrapper"] * 2
    _assert_suppression_is_exact(model)
