"""One rank of the DDP test; tests/integrations/test_ddp.py launches two of them with torchrun (gloo, CPU).

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/integrations/ddp_worker.py OUT_DIR

Each rank trains the same tiny LoRA model with ISTCallback in a Trainer and writes
``OUT_DIR/rank{r}.json`` (selections, importance, violations, the errors of the refused
setups) and ``OUT_DIR/rank{r}.safetensors`` (the adapter weights). The test runs
:func:`train` in one process with the same samples per optimizer step as the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback, TrainingArguments

from istune import ISTCallback, ISTConfig, SparseTuner
from tests.tiny_models import peft_model

NUM_LAYERS = 4
SAMPLES_PER_STEP = 4  # per optimizer step, over all ranks and accumulation micro-batches
ACCUMULATION = 2
MAX_STEPS = 6
CONFIG = dict(update_layers=1, probe_interval=2, seed=0)


class Examples(torch.utils.data.Dataset):
    """Random token rows of one length: every sample weighs the same in a mean loss, so a mean over ranks of
    per-rank means equals the single-process mean."""

    def __init__(self, size, seed):
        self.ids = torch.randint(0, 100, (size, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Per step: the selection, and whether exactly the selected layers got gradients and moved."""

    def __init__(self, ist):
        self.ist, self.selections, self.violations = ist, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.selections.append(list(self.ist.selected))
        self.before = [[p.detach().clone() for p in layer.parameters] for layer in self.ist.tuner.layers]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for j, layer in enumerate(self.ist.tuner.layers):
            has_grad = [p.grad is not None for p in layer.parameters]
            if not (all(has_grad) if j in self.ist.selected else not any(has_grad)):
                self.violations.append(f"step {state.global_step + 1}: layer {j} has gradients {has_grad}")

    def on_step_end(self, args, state, control, **kwargs):
        for j, (old, layer) in enumerate(zip(self.before, self.ist.tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            if not (all(moved) if j in self.ist.selected else not any(moved)):
                self.violations.append(f"step {state.global_step}: layer {j} moved {moved}")


def train(output_dir: str, world_size: int, rank: int, config: dict = CONFIG, **overrides):
    """Train with IST; the data are arranged so any world size sees the same samples per optimizer step.

    Plain SGD: Adam divides by the gradient's own size, which turns float noise in a near-zero
    gradient into visible weight differences between the two runs. Weight decay stays on, so a
    frozen adapter that got a zero gradient instead of none would move.
    """
    per_device = SAMPLES_PER_STEP // (world_size * ACCUMULATION)
    probe_share = SAMPLES_PER_STEP // world_size  # each rank probes its own share of the 4 probe examples
    probe = Examples(SAMPLES_PER_STEP, seed=1)
    probe = torch.utils.data.Subset(probe, range(rank * probe_share, (rank + 1) * probe_share))
    ist = ISTCallback(ISTConfig(**config, probe_batch_size=probe_share), probe_dataset=probe)
    recorder = Recorder(ist)
    args = dict(output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=ACCUMULATION, train_sampling_strategy="sequential",
                optim="sgd", learning_rate=0.1, weight_decay=0.1, lr_scheduler_type="constant", save_strategy="no",
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=100)
    if world_size > 1:
        args["ddp_backend"] = "gloo"
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **overrides}),
                      train_dataset=Examples(SAMPLES_PER_STEP * MAX_STEPS, seed=0), callbacks=[ist, recorder])
    trainer.train()
    return trainer, ist, recorder


def plain_loop(rank: int, steps: int = 4) -> dict:
    """SparseTuner on a DDP-wrapped model in a plain loop; each rank trains and probes on its own rows."""
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    wrapped = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tuner = SparseTuner(wrapped, ISTConfig(**CONFIG), optimizer=optimizer)
    ids = Examples(2 * steps, seed=10 + rank).ids
    selections = []
    for step in range(steps):
        selections.append(tuner.begin_step())
        batch = {"input_ids": ids[2 * step:2 * step + 2], "labels": ids[2 * step:2 * step + 2]}
        wrapped(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=batch)
    weights = torch.cat([p.detach().flatten() for p in adapter_weights(model).values()])
    return {"selections": selections, "importance": tuner.importance.tolist(),
            "weights_digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if "lora_" in name}


def _error_of(run) -> str:
    try:
        run()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def main(out_dir: str) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    trainer, ist, recorder = train(os.path.join(out_dir, "trainer"), world_size, rank)
    result = {
        "selections": recorder.selections,
        "importance": ist.importance.tolist(),
        "violations": recorder.violations,
        "gradient_checkpointing": trainer.model.base_model.model.model.layers[0].gradient_checkpointing,
    }
    save_file(adapter_weights(trainer.model), os.path.join(out_dir, f"rank{rank}.safetensors"))

    # The run-time cross-rank check: one rank's importance drifts.
    tuner = ist.tuner
    if rank == 1:
        tuner.importance = tuner.importance + 1e-9
    result["importance_drift"] = _error_of(tuner.check_in_sync)

    # Setups that must be refused, or caught, before any step (on every rank alike, so nothing hangs).
    scratch = os.path.join(out_dir, "scratch")
    result["seed_per_rank"] = _error_of(lambda: train(scratch, world_size, rank, {**CONFIG, "seed": rank}))
    result["reentrant"] = _error_of(lambda: train(scratch, world_size, rank,
                                                  gradient_checkpointing_kwargs={"use_reentrant": True}))
    result["find_unused_false"] = _error_of(lambda: train(scratch, world_size, rank, ddp_find_unused_parameters=False))
    result["plain_loop"] = plain_loop(rank)
    result["plain_loop_find_unused_false"] = _error_of(lambda: SparseTuner(DistributedDataParallel(
        peft_model("llama", "lora", num_layers=NUM_LAYERS))))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
