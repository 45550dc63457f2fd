"""The plain PyTorch loop of istune.integrations.loop, as documented."""

import pytest
import torch

from istune import ISTConfig
from istune.core import ProbeSampler
from istune.integrations.loop import train

from ..tiny_models import peft_model


def _dataset(size=24, length=8):
    ids = torch.randint(0, 100, (size, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _collate(examples):
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def test_plain_loop_with_gradient_accumulation():
    model = peft_model("qwen2", "lora", num_layers=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = _dataset()
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=_collate)
    sampler = ProbeSampler(data, _collate, batch_size=4, seed=0)
    tuner = train(model, optimizer, loader, ISTConfig(update_layers=1, probe_interval=2), probe_batches=sampler,
                  gradient_accumulation_steps=3)
    assert tuner.step == 4  # 12 micro-batches / 3
    selections = [e["selected"] for e in tuner.history if e["event"] == "select"]
    assert len(selections) == 4 and all(len(s) == 1 for s in selections)
    assert sum(e["event"] == "probe" for e in tuner.history) == 2
    assert tuner.importance.abs().sum() > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.requires_grad for layer in tuner.layers for p in layer.parameters)


@pytest.mark.parametrize("rule", ["lisa", "badam", "owlore", "gradnorm", "probe-once"])
def test_plain_loop_trains_every_rule(rule):
    model = peft_model("qwen2", "lora", num_layers=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = _dataset()
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=_collate)
    sampler = ProbeSampler(data, _collate, batch_size=4, seed=0)
    tuner = train(model, optimizer, loader, ISTConfig(strategy=rule, update_layers=1), probe_batches=sampler,
                  gradient_accumulation_steps=2, max_steps=5)
    selections = [e["selected"] for e in tuner.history if e["event"] == "select"]
    assert tuner.step == 5 and len(selections) == 5 and all(len(s) == 1 for s in selections)
    if rule == "badam":  # ascending blocks of one layer
        assert selections == [[0], [1], [2], [3], [0]]
    # the loop tells a gradient rule the norms of the layers that trained, once per optimizer step
    gradients = [e for e in tuner.history if e["event"] == "gradients"]
    assert [e["layers"] for e in gradients] == (selections if rule == "gradnorm" else [])


def test_probe_sampler_is_seeded_and_leaves_global_rng_alone():
    data = _dataset()
    state = torch.get_rng_state()
    first = [ProbeSampler(data, _collate, 4, seed=1)()["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert torch.equal(torch.get_rng_state(), state)
    sampler = ProbeSampler(data, _collate, 4, seed=1)
    assert not torch.equal(sampler()["input_ids"], sampler()["input_ids"])
