"""One rank of the DeepSpeed test (tests/integrations/test_deepspeed.py): two CPU processes (gloo), ZeRO-2 and ZeRO-3.

    PYTHONPATH=.:src accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        --num_processes 2 tests/integrations/deepspeed_worker.py OUT_DIR

Each rank trains the DDP test's tiny LoRA model (4 samples per optimizer step) with ``add_ist`` in a
Trainer under ZeRO-3 (from the launcher's config file), then ZeRO-2 (from TrainingArguments), with AdamW
and weight decay and a checkpoint at step 3; resumes each from its step-3 checkpoint; trains ZeRO-2 once
without IST's skipping (the control: every layer moves); checks the setups IST refuses; and writes
``OUT_DIR/rank{r}.json`` and the adapter weights (``OUT_DIR/zero{stage}_rank{r}.safetensors``, whole).
The test trains the same in one process without DeepSpeed as the reference (:func:`train`, ``stage=None``).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from istune import ISTCallback, ISTConfig, add_ist
from istune.integrations import deepspeed as ist_deepspeed
from tests.integrations.ddp_worker import ACCUMULATION, CONFIG, MAX_STEPS, NUM_LAYERS, SAMPLES_PER_STEP, Examples
from tests.tiny_models import peft_model

# AdamW with weight decay: without IST's skipping, ZeRO moves unselected adapters (decay, moments) at every step.
# Adam's first step is lr * g / (|g| + eps): with the default eps (1e-8) float noise in a near-zero gradient entry
# (two ranks sum in another order) flips its sign; eps = 1e-3 keeps the comparison with one process at float noise.
OPTIMIZER = dict(optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1, adam_epsilon=1e-3)


def zero_config(stage: int, world_size: int, **zero) -> dict:
    """A DeepSpeed config for 4 samples per optimizer step; the Trainer fills in the clipping ('auto')."""
    return {"zero_optimization": {"stage": stage, **zero}, "gradient_accumulation_steps": ACCUMULATION,
            "train_micro_batch_size_per_gpu": SAMPLES_PER_STEP // (world_size * ACCUMULATION),
            "train_batch_size": SAMPLES_PER_STEP, "gradient_clipping": "auto"}


def count_cpu_processes() -> None:
    """Make accelerate count the CPU processes under DeepSpeed (test only).

    accelerate 1.15 picks a distributed backend for accelerators, and for CPU processes only
    when told ``cpu=True``, which turns DeepSpeed off. Under DeepSpeed on CPU it thus lets
    DeepSpeed start torch.distributed but counts one process, so the Trainer would give every
    rank every batch. Choosing the backend as for CPU processes (gloo) gives the real count;
    accelerate then turns the state into DeepSpeed's as it does on GPUs.
    """
    from accelerate.state import PartialState

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return original(self, True, sagemaker_dp, backend)  # no accelerator here: as for CPU processes

    PartialState._prepare_backend = prepare_backend


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce (test only).

    On CPU, DeepSpeed's communication backend JIT-compiles a C++ shared-memory all-reduce when it
    starts (about 2 minutes on two cores), used only by inference's all-reduce; training uses
    torch.distributed (gloo). deepspeed.ops keeps the list of compatible ops in one dict that
    stays edited; marking the op incompatible skips the build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class Recorder(TrainerCallback):
    """Per step: the selection and which layers' adapters moved (whole values, gathered under ZeRO-3)."""

    def __init__(self, ist):
        self.ist, self.selections, self.moved = ist, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.selections.append(list(self.ist.selected))
        self.before = self._values()

    def on_step_end(self, args, state, control, **kwargs):
        after = self._values()
        self.moved.append([j for j, (old, new) in enumerate(zip(self.before, after))
                           if any(not torch.equal(a, b) for a, b in zip(old, new))])

    def _values(self) -> list[list[torch.Tensor]]:
        return [[value for value in gathered(layer.parameters).values()] for layer in self.ist.tuner.layers]


def gathered(parameters) -> dict[int, torch.Tensor]:
    """Whole copies of ``parameters`` (ZeRO-3 partitions them: every rank must call this)."""
    parameters = list(parameters)
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters):
            return {i: p.detach().clone() for i, p in enumerate(parameters)}
    return {i: p.detach().clone() for i, p in enumerate(parameters)}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    names, parameters = zip(*[(n, p) for n, p in model.named_parameters() if "lora_" in n])
    return {name: value.contiguous() for name, value in zip(names, gathered(parameters).values())}


def train(output_dir: str, world_size: int, rank: int, stage: int | None, resume=None, one_line: bool = False,
          ist_options: dict | None = None, zero: dict | None = None, ds_extra: dict | None = None, **overrides):
    """Train with IST (``add_ist``); ``stage`` None trains in plain torch (the reference, one process)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a ZeRO-3 Trainer of an earlier run would build the next model partitioned
    per_device = SAMPLES_PER_STEP // (world_size * ACCUMULATION)
    probe_share = SAMPLES_PER_STEP // world_size
    probe = torch.utils.data.Subset(Examples(SAMPLES_PER_STEP, seed=1), range(rank * probe_share,
                                                                             (rank + 1) * probe_share))
    config = ISTConfig(**CONFIG, probe_batch_size=probe_share, **(ist_options or {}))
    args = dict(output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=ACCUMULATION, train_sampling_strategy="sequential",
                lr_scheduler_type="constant", save_strategy="steps", save_steps=3, report_to=[], seed=0,
                disable_tqdm=True, logging_steps=1, use_cpu=stage is None, **OPTIMIZER)
    if stage is not None and not from_launcher(stage):
        args.update(deepspeed={**zero_config(stage, world_size, **(zero or {})), **(ds_extra or {})},
                    ddp_backend="gloo")
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    callbacks = [ISTCallback(config, probe_dataset=probe)] if one_line else []
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **overrides}),
                      train_dataset=Examples(SAMPLES_PER_STEP * MAX_STEPS, seed=0), callbacks=callbacks)
    ist = callbacks[0] if one_line else add_ist(trainer, config, probe_dataset=probe)
    recorder = Recorder(ist)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, ist, recorder


def from_launcher(stage: int) -> bool:
    """True when this process was launched with an accelerate config file for this ZeRO stage: the Trainer then
    takes DeepSpeed from it (configs/accelerate/deepspeed_zero{2,3}.yaml) rather than from TrainingArguments."""
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == str(stage)


def forget_launcher_deepspeed() -> None:
    """Drop the DeepSpeed settings the accelerate config file gave this process: later runs set their own
    (TrainingArguments(deepspeed=...)), which accelerate refuses beside a config file's."""
    for name in [name for name in os.environ if name.startswith("ACCELERATE_DEEPSPEED_")]:
        del os.environ[name]
    for name in ("ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                 "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_MIXED_PRECISION"):
        os.environ.pop(name, None)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _error_of(run) -> str:
    try:
        run()
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def moved_without_skipping(out_dir: str, rank: int, world_size: int, stage: int) -> list[list[int]]:
    """The layers that moved at each step when IST does not skip the unselected layers' groups (the control)."""
    hide = ist_deepspeed.UnselectedGroupsSkipped._hide
    ist_deepspeed.UnselectedGroupsSkipped._hide = lambda *args: None
    try:
        return train(os.path.join(out_dir, "scratch"), world_size, rank, stage, save_strategy="no")[2].moved
    finally:
        ist_deepspeed.UnselectedGroupsSkipped._hide = hide


class NaNAtStep(TrainerCallback):
    """Makes the gradients of optimizer step ``step`` (1-based) NaN: layer 0's output is NaN in its forwards."""

    def __init__(self, model, step: int):
        self.block, self.step, self.hook = model.base_model.model.model.layers[0], step, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.hook = self.block.register_forward_hook(lambda module, inputs, output: output * float("nan"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def nan_step(out_dir: str, rank: int, world_size: int, stage: int) -> dict:
    """Step 2 of 3 has NaN gradients: DeepSpeed skips it (nothing moves), IST counts it, training goes on."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    args = TrainingArguments(output_dir=os.path.join(out_dir, "scratch"), max_steps=3, per_device_train_batch_size=1,
                             gradient_accumulation_steps=ACCUMULATION, save_strategy="no", report_to=[],
                             disable_tqdm=True, deepspeed=zero_config(stage, world_size), ddp_backend="gloo",
                             **OPTIMIZER)
    trainer = Trainer(model=model, args=args, train_dataset=Examples(SAMPLES_PER_STEP * 3, seed=0))
    ist = add_ist(trainer, ISTConfig(**CONFIG))
    recorder = Recorder(ist)
    trainer.add_callback(recorder)
    trainer.add_callback(NaNAtStep(model, step=2))
    trainer.train()
    finite = all(bool(torch.isfinite(value).all()) for value in adapter_weights(trainer.model).values())
    return {"moved": recorder.moved, "selections": recorder.selections, "finite": finite,
            "skipped_steps": trainer.model_wrapped.skipped_steps}


def run_stage(out_dir: str, rank: int, world_size: int, stage: int) -> dict:
    """Train, save, resume from step 3; the results of one ZeRO stage."""
    run = os.path.join(out_dir, f"zero{stage}")
    trainer, ist, recorder = train(run, world_size, rank, stage)
    engine = trainer.model_wrapped
    result = {"engine": type(engine).__name__, "stage": engine.zero_optimization_stage(),
              "world_size": trainer.accelerator.num_processes, "from_launcher": from_launcher(stage),
              "groups": len(engine.optimizer.optimizer.param_groups),
              "selections": recorder.selections, "moved": recorder.moved, "losses": losses(trainer),
              "importance": ist.importance.tolist()}
    save_file(adapter_weights(trainer.model), os.path.join(out_dir, f"zero{stage}_rank{rank}.safetensors"))
    trainer.save_model(os.path.join(out_dir, f"zero{stage}_adapter"))  # every rank: ZeRO-3 gathers the weights
    resumed, resumed_ist, resumed_recorder = train(run, world_size, rank, stage,
                                                   resume=os.path.join(run, "checkpoint-3"))
    result["resumed"] = {"selections": resumed_recorder.selections, "moved": resumed_recorder.moved,
                         "losses": losses(resumed)[-3:], "importance": resumed_ist.importance.tolist()}
    save_file(adapter_weights(resumed.model), os.path.join(out_dir, f"zero{stage}_resumed{rank}.safetensors"))
    return result


def main(out_dir: str) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    skip_shared_memory_allreduce()
    count_cpu_processes()
    result = {"zero3": run_stage(out_dir, rank, world_size, 3)}  # DeepSpeed from the launcher's config file
    forget_launcher_deepspeed()
    result["zero2"] = run_stage(out_dir, rank, world_size, 2)
    result["zero2"]["moved_without_skipping"] = moved_without_skipping(out_dir, rank, world_size, 2)
    result["zero2"]["nan_step"] = nan_step(out_dir, rank, world_size, 2)
    scratch = os.path.join(out_dir, "scratch")
    result["refused"] = {
        "optimizer_in_config": _error_of(lambda: train(scratch, world_size, rank, 2, ds_extra={
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})),
        "offload_optimizer": _error_of(lambda: train(scratch, world_size, rank, 2,
                                                     zero={"offload_optimizer": {"device": "cpu"}})),
        "offload_param": _error_of(lambda: train(scratch, world_size, rank, 3,
                                                 zero={"offload_param": {"device": "cpu"}})),
        "drop_state": _error_of(lambda: train(scratch, world_size, rank, 2,
                                              ist_options={"unselected_optimizer_state": "drop"})),
        "stage_1": _error_of(lambda: train(scratch, world_size, rank, 1)),
        "one_line": _error_of(lambda: train(scratch, world_size, rank, 2, one_line=True)),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
