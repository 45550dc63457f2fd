"""One rank of the DDP and FSDP2 tests (tests/integrations/test_ddp.py, test_fsdp.py), two CPU processes (gloo).

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/integrations/ddp_worker.py OUT_DIR
    PYTHONPATH=. accelerate launch --config_file configs/accelerate/fsdp2.yaml --cpu --num_processes 2 \\
        tests/integrations/ddp_worker.py OUT_DIR fsdp2

Each rank trains the same tiny LoRA model with ISTCallback in a Trainer (in the one-line form
``callbacks=[ISTCallback(...)]`` under DDP, with ``add_ist`` under FSDP2) and writes
``OUT_DIR/rank{r}.json`` (selections, losses, importance, violations, the errors of the refused
setups) and ``OUT_DIR/rank{r}.safetensors`` (the adapter weights, whole). The tests run
:func:`train` (and :func:`sharded_loop`) in one process with the same samples per optimizer
step as the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback, TrainingArguments

from istune import ISTCallback, ISTConfig, SparseTuner, add_ist
from istune.core.layers import prepare_full_layer_tuning
from istune.core.selection import SelectionRule
from istune.core.sharding import full_tensor, has_dtensor_parameters, is_fsdp2
from tests.tiny_models import peft_model, tiny_model

NUM_LAYERS = 4
SAMPLES_PER_STEP = 4  # per optimizer step, over all ranks and accumulation micro-batches
ACCUMULATION = 2
MAX_STEPS = 6
CONFIG = dict(update_layers=1, probe_interval=2, seed=0)
# FSDP2 through TrainingArguments: one FSDP unit per decoder layer (the model's _no_split_modules).
FSDP2 = dict(fsdp="full_shard auto_wrap", fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"})
# The FSDP2 runs use SGD with momentum: torch cannot load an FSDP2 checkpoint of an optimizer without state.
MOMENTUM = dict(optim_args="momentum=0.9")
# The selection rules besides IST, each in the plain loop (about a second each).
RULES = {"lisa": {"switch_interval": 2}, "badam": {"block_order": "random"}, "owlore": {"calibration_interval": 2},
         "gradnorm": {}, "probe-once": {"probe_by": "suppression"}}


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
        self.before = [[_local(p).clone() for p in layer.parameters] for layer in self.ist.tuner.layers]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for j, layer in enumerate(self.ist.tuner.layers):
            has_grad = [p.grad is not None for p in layer.parameters]
            if not (all(has_grad) if j in self.ist.selected else not any(has_grad)):
                self.violations.append(f"step {state.global_step + 1}: layer {j} has gradients {has_grad}")

    def on_step_end(self, args, state, control, **kwargs):
        for j, (old, layer) in enumerate(zip(self.before, self.ist.tuner.layers)):
            moved = [not torch.equal(a, _local(b)) for a, b in zip(old, layer.parameters)]
            if not (all(moved) if j in self.ist.selected else not any(moved)):
                self.violations.append(f"step {state.global_step}: layer {j} moved {moved}")


def train(output_dir: str, world_size: int, rank: int, config: dict = CONFIG, resume=None, explicit: bool = False,
          **overrides):
    """Train with IST; the data are arranged so any world size sees the same samples per optimizer step.

    ``explicit``: add IST with ``add_ist(trainer, ...)`` rather than in ``Trainer(callbacks=[...])``.

    Plain SGD: Adam divides by the gradient's own size, which turns float noise in a near-zero
    gradient into visible weight differences between the two runs. Weight decay stays on, so a
    frozen adapter that got a zero gradient instead of none would move.
    """
    per_device = SAMPLES_PER_STEP // (world_size * ACCUMULATION)
    probe_share = SAMPLES_PER_STEP // world_size  # each rank probes its own share of the 4 probe examples
    probe = Examples(SAMPLES_PER_STEP, seed=1)
    probe = torch.utils.data.Subset(probe, range(rank * probe_share, (rank + 1) * probe_share))
    ist_config = ISTConfig(**config, probe_batch_size=probe_share)
    ist = None if explicit else ISTCallback(ist_config, probe_dataset=probe)
    args = dict(output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=ACCUMULATION, train_sampling_strategy="sequential",
                optim="sgd", learning_rate=0.1, weight_decay=0.1, lr_scheduler_type="constant", save_strategy="no",
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1)
    if world_size > 1:
        args["ddp_backend"] = "gloo"
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **overrides}),
                      train_dataset=Examples(SAMPLES_PER_STEP * MAX_STEPS, seed=0), callbacks=[ist] if ist else [])
    if explicit:
        ist = add_ist(trainer, ist_config, probe_dataset=probe)
    recorder = Recorder(ist)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, ist, recorder


def plain_loop(rank: int, steps: int = 4, config: dict = CONFIG) -> dict:
    """SparseTuner on a DDP-wrapped model in a plain loop; each rank trains, probes and measures on its own rows."""
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    wrapped = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probe_ids = Examples(4, seed=20 + rank).ids
    tuner = SparseTuner(wrapped, ISTConfig(**config), optimizer=optimizer,
                        probe_batches=lambda: {"input_ids": probe_ids, "labels": probe_ids})
    ids = Examples(2 * steps, seed=10 + rank).ids
    selections = []
    for step in range(steps):
        selections.append(tuner.begin_step())
        batch = {"input_ids": ids[2 * step:2 * step + 2], "labels": ids[2 * step:2 * step + 2]}
        wrapped(**batch).loss.backward()
        tuner.before_optimizer_step()  # 'gradnorm' learns from the (all-reduced) gradients
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=batch)
    weights = torch.cat([p.detach().flatten() for p in adapter_weights(model).values()])
    return {"selections": selections, "importance": tuner.importance.tolist(),
            "weights_digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}


def sharded_loop(rank: int, world_size: int, steps: int = 4) -> dict:
    """SparseTuner in a plain loop on a model sharded with ``fully_shard`` (one unit per decoder layer) when
    ``world_size > 1``; every step trains on 4 rows, each rank on its share (the probe batch too).

    SGD with momentum and ``unselected_optimizer_state='drop'`` (a layer selected again restarts its
    momentum), and ``recompute_unselected``: both options under FSDP2 against one process.
    """
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    if world_size > 1:
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    config = ISTConfig(**CONFIG, unselected_optimizer_state="drop", recompute_unselected=True)
    tuner = SparseTuner(model, config, optimizer=optimizer)
    ids = Examples(SAMPLES_PER_STEP * steps, seed=20).ids
    share = SAMPLES_PER_STEP // world_size
    selections, losses = [], []
    for step in range(steps):
        selections.append(tuner.begin_step())
        rows = ids[SAMPLES_PER_STEP * step + rank * share:SAMPLES_PER_STEP * step + (rank + 1) * share]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch={"input_ids": rows, "labels": rows})
        losses.append(_mean_over_ranks(loss.detach()))
    return {"selections": selections, "losses": losses, "importance": tuner.importance.tolist(),
            "weights": adapter_weights(model)}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """Every adapter tensor, whole (gathered from the shards under FSDP2: all ranks must call it)."""
    return {name: full_tensor(p.detach()).clone().contiguous() for name, p in model.named_parameters()
            if "lora_" in name}


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter, else the parameter (detached)."""
    return parameter.detach().to_local() if hasattr(parameter, "to_local") else parameter.detach()


def _mean_over_ranks(value: torch.Tensor) -> float:
    if torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _error_of(run) -> str:
    try:
        run()
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def main(out_dir: str, mode: str = "ddp") -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if mode == "fsdp2":
        return main_fsdp2(out_dir, rank, world_size)
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
    result["find_unused_false_explicit"] = _error_of(lambda: train(scratch, world_size, rank, explicit=True,
                                                                   ddp_find_unused_parameters=False))
    result["static_graph"] = _error_of(lambda: train(scratch, world_size, rank, ddp_static_graph=True))
    result["plain_loop"] = plain_loop(rank)
    result["rules"] = {rule: plain_loop(rank, config={**CONFIG, "strategy": rule, **options})
                       for rule, options in RULES.items()}
    result["plain_loop_find_unused_false"] = _error_of(lambda: SparseTuner(DistributedDataParallel(
        peft_model("llama", "lora", num_layers=NUM_LAYERS))))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def enable_fsdp_on_cpu() -> None:
    """Let accelerate shard with FSDP on CPU processes (test only).

    accelerate 1.15 honours an FSDP plugin (from TrainingArguments or ``accelerate launch --config_file``)
    only for accelerator backends: on CPU processes it silently trains with DDP instead. This makes
    the state it builds there FSDP with the plugin it was given, so the Trainer's own FSDP2 path
    (``fully_shard`` in ``accelerator.prepare``, the FULL_STATE_DICT save, the checkpoint load) runs
    here as it does on GPUs.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        fsdp_plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)  # every later AcceleratorState() re-inits
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def main_fsdp2(out_dir: str, rank: int, world_size: int) -> None:
    """The FSDP2 run: configured by the accelerate config file this process was launched with; then resumed
    from its step-3 checkpoint with FSDP2 set through TrainingArguments; then the plain loop on fully_shard."""
    enable_fsdp_on_cpu()
    run = os.path.join(out_dir, "trainer")
    result = {"one_line_saving": _error_of(lambda: train(os.path.join(out_dir, "scratch"), world_size, rank,
                                                        save_strategy="steps", save_steps=3, **MOMENTUM))}
    trainer, ist, recorder = train(run, world_size, rank, explicit=True, save_strategy="steps", save_steps=3,
                                   **MOMENTUM)
    result.update({
        "sharded": is_fsdp2(trainer.model) and has_dtensor_parameters(trainer.model),
        "selections": recorder.selections,
        "losses": _losses(trainer),
        "importance": ist.importance.tolist(),
        "violations": recorder.violations,
    })
    save_file(adapter_weights(trainer.model), os.path.join(out_dir, f"rank{rank}.safetensors"))
    trainer.save_model(os.path.join(out_dir, "adapter"))  # every rank takes part in gathering the full state dict

    resumed, resumed_ist, resumed_recorder = train(run, world_size, rank, resume=os.path.join(run, "checkpoint-3"),
                                                    explicit=True, **MOMENTUM, **FSDP2)
    result["resumed"] = {"sharded": is_fsdp2(resumed.model), "selections": resumed_recorder.selections,
                         "losses": _losses(resumed)[-3:],
                         "importance": resumed_ist.importance.tolist(),
                         "violations": resumed_recorder.violations}
    save_file(adapter_weights(resumed.model), os.path.join(out_dir, f"resumed{rank}.safetensors"))

    ist.tuner.importance = ist.tuner.importance + (1e-9 if rank == 1 else 0.0)
    result["importance_drift"] = _error_of(ist.tuner.check_in_sync)

    loop = sharded_loop(rank, world_size)
    save_file(loop.pop("weights"), os.path.join(out_dir, f"loop{rank}.safetensors"))
    result["plain_loop"] = loop
    result["full_layers_ist"] = _error_of(lambda: SparseTuner(_sharded_full_layers(), ISTConfig(**CONFIG)))
    result["full_layers_random"] = _error_of(lambda: SparseTuner(_sharded_full_layers(),
                                                                 ISTConfig(**{**CONFIG, "strategy": "random"})))
    # refused by what a rule does, not by its name: probe-once by suppression and a rule of the user's own
    result["full_layers_probe_once"] = _error_of(lambda: SparseTuner(_sharded_full_layers(), ISTConfig(
        **{**CONFIG, "strategy": "probe-once", "probe_by": "suppression"})))
    result["full_layers_own_rule"] = _error_of(lambda: SparseTuner(_sharded_full_layers(), ISTConfig(**CONFIG),
                                                                   rule=SuppressingRule()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


class SuppressingRule(SelectionRule):
    """A rule of a user's own whose choice reads suppression probes (eq. 8), as IST's does."""

    name = "suppressing"
    uses_probe_losses = True

    def select(self, view):
        losses = view.probe_losses([[i] for i in range(view.num_layers)])
        return sorted(torch.argsort(losses)[: view.count].tolist())


def _sharded_full_layers():
    model = prepare_full_layer_tuning(tiny_model("llama", num_layers=NUM_LAYERS)).train()
    for block in model.model.layers:
        fully_shard(block)
    return fully_shard(model)


if __name__ == "__main__":
    main(*sys.argv[1:])
