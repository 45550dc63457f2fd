"""Injection, training, save/load of bottleneck adapters on tiny models of each family."""

import json

import pytest
import torch

from istune.adapters import (
    DEFAULT_TARGET_MODULES,
    BottleneckConfig,
    BottleneckLayer,
    add_bottleneck_adapters,
    add_paper_bottleneck_adapters,
    bottleneck_layers,
    count_trainable_parameters,
    linear_module_names,
    load_bottleneck_adapters,
    save_bottleneck_adapters,
)
from istune.adapters.model import CONFIG_NAME, WEIGHTS_NAME

from ..tiny_models import CORE_FAMILIES, KINDS, TINY_CONFIGS, logits, tiny_model

CASES = [(family, kind) for family in CORE_FAMILIES for kind in KINDS]


def adapted(family, kind, **overrides):
    config = BottleneckConfig(kind=kind, bottleneck_size=8, **overrides)
    return add_bottleneck_adapters(tiny_model(family), config)


def train_one_step(model, input_ids, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_start_exactly_at_base_model(family, kind, input_ids):
    model = adapted(family, kind)
    layers = bottleneck_layers(model)
    assert len(layers) == 2 * len(DEFAULT_TARGET_MODULES[family][kind])  # 2 decoder layers
    assert torch.equal(logits(model, input_ids), logits(tiny_model(family), input_ids))


@pytest.mark.parametrize("family, kind", CASES)
def test_only_adapter_parameters_train(family, kind, input_ids):
    model = adapted(family, kind)
    adapter_ids = {id(p) for layer in bottleneck_layers(model).values()
                   for p in layer.adapter_parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter_ids
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logits_before = logits(model, input_ids)

    train_one_step(model, input_ids)

    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            continue
        assert torch.equal(p, before[name]), f"base parameter {name} changed"
    for name, layer in bottleneck_layers(model).items():
        assert not torch.equal(layer.adapter_up.weight, before[f"{name}.adapter_up.weight"])
    assert not torch.allclose(logits(model, input_ids), logits_before)


@pytest.mark.parametrize("family, kind", CASES)
def test_save_load_round_trip_on_fresh_base(family, kind, input_ids, tmp_path):
    model = train_one_step(adapted(family, kind, non_linearity="relu", scaling=2.0), input_ids)
    save_bottleneck_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME])  # no temporary files left behind

    fresh = load_bottleneck_adapters(tiny_model(family), tmp_path / "adapters")
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    assert count_trainable_parameters(fresh)[0] == 0
    config = next(iter(bottleneck_layers(fresh).values())).config
    assert (config.kind, config.non_linearity, config.scaling) == (kind, "relu", 2.0)


def test_load_trainable_and_second_kind_round_trip(input_ids, tmp_path):
    # The paper's series recipe on LLaMA: output side of down_proj, input side of up_proj.
    model = adapted("llama", "series", target_modules=["down_proj"])
    add_bottleneck_adapters(model, BottleneckConfig(kind="series_input", bottleneck_size=8,
                                                    target_modules=["up_proj"]))
    assert len(bottleneck_layers(model)) == 4
    train_one_step(model, input_ids)
    save_bottleneck_adapters(model, tmp_path)
    manifest = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {g["config"]["kind"] for g in manifest["adapters"]} == {"series", "series_input"}

    fresh = load_bottleneck_adapters(tiny_model("llama"), tmp_path, trainable=True)
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    assert count_trainable_parameters(fresh) == count_trainable_parameters(model)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_no_match_lists_linear_module_names(family):
    model = tiny_model(family)
    with pytest.raises(ValueError, match="matched no module") as err:
        add_bottleneck_adapters(model, BottleneckConfig(target_modules=["no_such_proj"]))
    names = linear_module_names(model)
    assert names and all(name in str(err.value) for name in names)


def test_gpt2_conv1d_names_are_listed():
    assert "transformer.h.0.attn.c_attn" in linear_module_names(tiny_model("gpt2"))


@pytest.mark.parametrize("targets, error", [
    (["mlp"], "wrap linear"),            # a container, not a linear layer
    (["down_proj"], "already holds"),    # wrapped twice
])
def test_bad_targets_fail_loudly(targets, error):
    model = adapted("llama", "series", target_modules=["down_proj"])
    with pytest.raises(ValueError, match=error):
        add_bottleneck_adapters(model, BottleneckConfig(target_modules=targets))


def test_regex_targets_and_unknown_family_default():
    model = adapted("opt", "parallel", target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    assert sorted(bottleneck_layers(model)) == ["model.decoder.layers.1.self_attn.q_proj",
                                                "model.decoder.layers.1.self_attn.v_proj"]
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default"):
        add_bottleneck_adapters(plain, BottleneckConfig())
    add_bottleneck_adapters(plain, BottleneckConfig(target_modules=["0"], bottleneck_size=2))
    assert isinstance(plain[0], BottleneckLayer)


def test_count_trainable_parameters():
    model = adapted("llama", "parallel")  # up/gate: 32 -> 8 -> 64, two per layer, 2 layers
    trainable, total = count_trainable_parameters(model)
    assert trainable == 2 * 2 * (32 * 8 + 8 * 64)
    assert total == trainable + count_trainable_parameters(tiny_model("llama"))[1]


def test_save_without_adapters_and_load_from_empty_dir_fail(tmp_path):
    with pytest.raises(ValueError, match="no bottleneck adapters"):
        save_bottleneck_adapters(tiny_model("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_bottleneck_adapters(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("family, series, parallel", [
    ("llama", {"mlp.down_proj": "series", "mlp.up_proj": "series_input"},
     {"mlp.up_proj": "parallel", "mlp.gate_proj": "parallel"}),
    ("gpt2", {"mlp.c_proj": "series", "mlp.c_fc": "series_input"}, {"mlp.c_fc": "parallel"}),
    ("opt", {"fc2": "series", "fc1": "series_input"}, {"fc1": "parallel"}),
])
def test_paper_placement_follows_table_9(family, series, parallel, input_ids):
    for method, expected in (("series", series), ("parallel", parallel)):
        model = add_paper_bottleneck_adapters(tiny_model(family), method)
        layers = bottleneck_layers(model)
        first = {name.split(".0.", 1)[1]: layer.kind for name, layer in layers.items() if ".0." in name}
        assert first == expected and len(layers) == 2 * len(expected)  # 2 decoder layers
        assert all(layer.config.bottleneck_size == 256 for layer in layers.values())  # the paper's size
        assert torch.equal(logits(model, input_ids), logits(tiny_model(family), input_ids))  # zero-init up


def test_paper_placement_errors_name_the_problem():
    with pytest.raises(ValueError, match="method='lora'.*series, parallel"):
        add_paper_bottleneck_adapters(tiny_model("llama"), "lora")
    with pytest.raises(ValueError, match="places adapters itself"):
        add_paper_bottleneck_adapters(tiny_model("llama"), "series", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no paper placement"):
        add_paper_bottleneck_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), "series")
