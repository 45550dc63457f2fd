"""MemoryTracker: exact byte counts per category on small models, peaks, regions, determinism."""

import pytest
import torch
from torch import nn

from istune.planning.tracker import CATEGORIES, MemoryTracker

FLOAT = 4  # bytes per float32


def make_mlp(frozen_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))  # 144 + 68 parameters
    if frozen_first:
        model[0].requires_grad_(False)
    return model


def batch() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def test_weights_are_parameter_and_buffer_bytes():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    with MemoryTracker(model) as tracker:
        pass
    expected = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert tracker.report()["current"]["weights"] == expected
    assert tracker.report()["peak_bytes"] == expected


def test_tied_and_view_storages_count_once():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # tied, as in GPT-2
    model = nn.ModuleDict({"emb": emb, "head": head})
    with MemoryTracker(model) as tracker:
        x = torch.empty(100)  # 400 bytes
        views = [x.view(10, 10), x[3:], x.view(10, 10).t()]
        tracker_now = tracker.current()
        del views, x
    assert tracker_now["weights"] == 10 * 6 * FLOAT
    assert tracker_now["other"] == 100 * FLOAT


def test_known_allocation_raises_peak_exactly():
    def peak(extra: bool) -> int:
        model = make_mlp()
        optimizer = adamw(model)
        with MemoryTracker(model, optimizer) as tracker:
            held = torch.empty(1000, dtype=torch.float32) if extra else None
            for _ in range(2):
                train_step(model, optimizer, batch())
            del held
        return tracker.report()["peak_bytes"]

    assert peak(True) - peak(False) == 4000


def test_freed_memory_is_counted_off():
    model = make_mlp()
    with MemoryTracker(model) as tracker:
        x = torch.empty(250)
        assert tracker.current()["other"] == 1000
        del x
        assert tracker.current()["other"] == 0
    assert tracker.report()["peak_bytes"] == sum(p.nbytes for p in model.parameters()) + 1000


@pytest.mark.parametrize("frozen_first", [False, True], ids=["all_trainable", "first_frozen"])
def test_gradient_bytes_after_backward(frozen_first):
    model = make_mlp(frozen_first)
    with MemoryTracker(model) as tracker:
        model(batch()).square().mean().backward()
        grads = tracker.current()["gradients"]
    assert grads == sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    assert grads == sum(p.nbytes for p in model.parameters() if p.requires_grad)


def test_adam_state_is_two_moments_plus_step_scalars():
    model = make_mlp(frozen_first=True)
    optimizer = adamw(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with MemoryTracker(model, optimizer) as tracker:
        train_step(model, optimizer, batch())
        after = tracker.current()
    # exp_avg and exp_avg_sq per parameter, and a float32 `step` tensor per parameter on CPU
    assert after["optimizer"] == 2 * sum(p.nbytes for p in trainable) + FLOAT * len(trainable)
    assert after["gradients"] == 0  # zero_grad(set_to_none=True)


def test_optimizer_state_from_before_the_block_is_counted():
    model = make_mlp()
    optimizer = adamw(model)
    train_step(model, optimizer, batch())
    with MemoryTracker(model, optimizer) as tracker:
        pass
    n_params = len(list(model.parameters()))
    assert tracker.report()["current"]["optimizer"] == 2 * sum(p.nbytes for p in model.parameters()) + FLOAT * n_params


def test_saved_activations_and_other_split():
    weight = nn.Parameter(torch.randn(8, 16))
    holder = nn.Module()
    holder.weight = weight
    with MemoryTracker(holder) as tracker:
        x = torch.randn(5, 8)  # saved by mm (needed for weight's grad)
        y = x @ weight  # not saved: tanh saves its output
        z = y.tanh()  # saved
        loss = z.sum()  # sum saves only sizes
        now = tracker.current()
        loss.backward()
    assert now["activations"] == x.nbytes + z.nbytes
    assert now["other"] == y.nbytes + loss.nbytes


def test_activations_attributed_to_scopes():
    model = make_mlp()
    scopes = {"first": model[0], "last": model[2]}
    with MemoryTracker(model, scopes=scopes) as tracker:
        x = batch()
        out = model(x)  # Linear saves its input; Tanh saves its output (outside the scopes)
        peak = tracker.report()["peak_activations_by_scope"]
        now = tracker.current()
        del out
    # Linear(8, 16) saved x (5x8); Linear(16, 4) saved the tanh output (5x16), first saved by Tanh (no scope)
    assert peak == {"first": 5 * 8 * FLOAT, "last": 0}
    assert now["activations"] == (5 * 8 + 5 * 16) * FLOAT


def test_peak_is_sum_of_its_breakdown_and_bounds_every_category():
    model = make_mlp()
    optimizer = adamw(model)
    with MemoryTracker(model, optimizer) as tracker:
        for _ in range(3):
            train_step(model, optimizer, batch())
    report = tracker.report()
    assert set(report["peak_breakdown"]) == set(CATEGORIES)
    assert report["peak_bytes"] == sum(report["peak_breakdown"].values())
    for name in CATEGORIES:
        assert report["category_max"][name] >= report["peak_breakdown"][name]


def test_regions_report_their_own_peaks():
    model = make_mlp()
    optimizer = adamw(model)
    with MemoryTracker(model, optimizer) as tracker:
        for step in range(3):
            with tracker.region(f"step {step}"):
                train_step(model, optimizer, batch())
        with tracker.region("idle"):
            pass
    report = tracker.report()
    names = [r["name"] for r in report["regions"]]
    assert names == ["step 0", "step 1", "step 2", "idle"]
    peaks = [r["peak_bytes"] for r in report["regions"]]
    assert max(peaks) == report["peak_bytes"]
    assert peaks[0] <= peaks[1] == peaks[2]  # same work each step; Adam state exists from the first step's end
    assert report["regions"][0]["peak_breakdown"]["optimizer"] <= report["regions"][1]["peak_breakdown"]["optimizer"]
    assert peaks[3] == sum(report["current"].values())


def test_regions_do_not_nest_and_tracker_is_used_once():
    model = make_mlp()
    tracker = MemoryTracker(model)
    with tracker:
        with tracker.region("outer"):
            with pytest.raises(RuntimeError, match="do not nest"):
                with tracker.region("inner"):
                    pass
    with pytest.raises(RuntimeError, match="used once"):
        with tracker:
            pass


def test_frozen_and_toggled_parameters_are_tracked():
    """Sparse tuning flips requires_grad between steps; the tracker must follow (torch's MemTracker raises)."""
    model = make_mlp()
    optimizer = adamw(model)
    layers = [model[0], model[2]]
    with MemoryTracker(model, optimizer) as tracker:
        for step in range(4):
            for i, layer in enumerate(layers):
                layer.requires_grad_(i == step % 2)
            with tracker.region(f"step {step}"):
                model(batch()).square().mean().backward()
                grads = tracker.current()["gradients"]
                assert grads == sum(p.nbytes for p in layers[step % 2].parameters())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    n_params = len(list(model.parameters()))
    expected_state = 2 * sum(p.nbytes for p in model.parameters()) + FLOAT * n_params
    assert tracker.report()["current"]["optimizer"] == expected_state


def run_lora_gpt2() -> dict:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, lora_dropout=0.1)
    model = peft.get_peft_model(model, lora)
    optimizer = adamw(model)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    blocks = model.base_model.model.transformer.h
    with MemoryTracker(model, optimizer, scopes={f"layer {i}": b for i, b in enumerate(blocks)}) as tracker:
        for step in range(2):
            with tracker.region(f"step {step}"):
                model(input_ids=x, labels=x).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return tracker.report()


def test_deterministic_across_runs():
    first, second = run_lora_gpt2(), run_lora_gpt2()
    assert first == second
    assert first["peak_activations_by_scope"]["layer 0"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_reported():
    model = make_mlp().cuda()
    optimizer = adamw(model)
    with MemoryTracker(model, optimizer) as tracker:
        model(batch().cuda()).square().mean().backward()
        optimizer.step()
    report = tracker.report()
    assert report["device"].startswith("cuda")
    assert report["allocator_peak_bytes"] >= report["peak_bytes"]  # the allocator also rounds blocks up


def test_peak_phase():
    model = make_mlp()
    with MemoryTracker(model) as tracker:
        big = torch.empty(10_000)
        del big
    assert tracker.report()["peak_phase"] == "forward"

    weight = nn.Parameter(torch.randn(8))
    holder = nn.Module()
    holder.weight = weight
    with MemoryTracker(holder) as tracker:
        y = weight * 2
        y.register_hook(lambda grad: torch.empty(10_000).sum().mul(0).add(grad))  # a big temporary in backward
        y.sum().backward()
    assert tracker.report()["peak_phase"] == "backward"

    model = make_mlp()
    optimizer = adamw(model)
    with MemoryTracker(model, optimizer) as tracker:
        train_step(model, optimizer, torch.randn(1, 8))  # one example: Adam's state outweighs the activations
    assert tracker.report()["peak_phase"] == "optimizer step"
