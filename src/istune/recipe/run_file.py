"""The run file of ``istune train`` (in its checkpoints and output folder), the run's state, and the resume check.

``istune_run.json`` (the run's istune options: data, model loading, PEFT method, IST) is
written into every ``checkpoint-K`` the Trainer saves, after the Trainer's own files. A
checkpoint without it is one whose saving was cut short: ``--resume_from_checkpoint true``
passes over it. ``--resume_from_checkpoint`` is compared with it before the model loads:
a checkpoint of another model, PEFT method, adapter shape or IST strategy is refused.

The output folder's own ``istune_run.json`` also says how far the run got, in its ``state``
field; every file below is written whole or not at all, in this order:

1. ``adapter/`` (the trained adapters), when training ends;
2. ``istune_run.json`` with ``"state": "trained"`` and ``"training_results"`` (the Trainer's
   options, batch layout, importance, log history and timings the results will hold);
3. ``results.json`` (the evaluation of the tuned and the base model, and all of the above);
4. ``istune_run.json`` again, with ``"state": "evaluated"``.

So :func:`run_state` reads the folder as: ``"complete"`` once ``results.json`` exists (step 3;
step 4 only repeats it); ``"trained"`` when steps 1 and 2 are done (the evaluation was cut
short: ``--resume_from_checkpoint true`` evaluates the saved adapters without training
again and writes the ``results.json`` an uninterrupted run writes); ``"partial"`` when
``adapter/`` exists without step 2 (killed between steps 1 and 2, or a run of an older
istune: only its checkpoints can resume it); None when no final output exists yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from istune.config import ISTConfig, option_names
from istune.io import write_text

RUN_FILE = "istune_run.json"
RESULTS_FILE = "results.json"
ADAPTER_FOLDER = "adapter"
# The run file's "state" (see the module docstring) and what run_state() reads from the folder.
TRAINED, EVALUATED = "trained", "evaluated"
COMPLETE, PARTIAL = "complete", "partial"
# ISTConfig fields that change neither which layers are chosen nor the updates: how much memory a step keeps
# (the same gradients), and IST's seed (the checkpoint holds IST's RNG state, which a resume restores).
_SAME_RUN_ANY_VALUE = ("recompute_unselected", "stored_layers", "seed")
# What must match for a checkpoint to resume: the parameters it holds and every setting of how IST selects
# them and updates its importance (every rule's parameters included), each compared with the saved value.
_MUST_MATCH = {
    "run": ("model",),
    "adapter": ("method", "rank", "target_modules", "bottleneck_size"),
    "model_loading": ("load_in_4bit", "load_in_8bit"),
}


def must_match() -> dict[str, tuple[str, ...]]:
    """The options a resume compares with the checkpoint's, by group; IST's are all of ISTConfig's options
    (the registered rules' parameters too) but those in ``_SAME_RUN_ANY_VALUE``."""
    ist = tuple(name for name in option_names() if name not in _SAME_RUN_ANY_VALUE)
    return {**_MUST_MATCH, "ist": ist}


def write_run_file(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``record`` as ``folder/istune_run.json``, whole or not at all."""
    write_text(Path(folder) / RUN_FILE, json.dumps(record, indent=2, default=str))


def read_run_file(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``istune_run.json`` of ``folder``; an empty dict when it is absent or unreadable."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_state(output_dir: str | os.PathLike) -> str | None:
    """How far the run in ``output_dir`` got: "complete", "trained", "partial" or None (see the module docstring)."""
    folder = Path(output_dir)
    if (folder / RESULTS_FILE).is_file():
        return COMPLETE
    if not (folder / ADAPTER_FOLDER).exists():
        return None
    saved = read_run_file(folder)
    return TRAINED if saved.get("state") in (TRAINED, EVALUATED) and "training_results" in saved else PARTIAL


def check_same_run(output_dir: str, record: dict[str, Any]) -> None:
    """Refuse to finish the trained run in ``output_dir`` with options other than those it was trained with."""
    saved = json.loads(json.dumps({group: read_run_file(output_dir).get(group, {}) for group in record}))
    wanted = json.loads(json.dumps(record, default=str))
    differences = [f"--{name}={value!r} (run: {saved[group].get(name)!r})"
                   for group, values in wanted.items() for name, value in values.items()
                   if saved[group].get(name) != value]
    if differences:
        raise ValueError(f"--output_dir={output_dir!r} holds a run trained with other options: "
                         f"{'; '.join(differences[:4])}. Give the options it was trained with to finish its "
                         "evaluation, or choose another --output_dir for a new run.")


class RunFileCallback(TrainerCallback):
    """Writes the run record into every checkpoint the Trainer saves (main process)."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_run_file(checkpoint, self.record)


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: None, a checkpoint folder, or 'true' for the latest in ``output_dir``."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() == "true":
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            raise ValueError(f"--resume_from_checkpoint=true: --output_dir={output_dir!r} holds no complete "
                             f"{PREFIX_CHECKPOINT_DIR}-* folder (one with {RUN_FILE}); give a checkpoint folder, "
                             "or train without --resume_from_checkpoint.")
        return latest
    if not (Path(value) / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint={value!r} is not a Trainer checkpoint (no trainer_state.json); "
                         f"give a {PREFIX_CHECKPOINT_DIR}-K folder of a run saved with --save_strategy steps.")
    return str(value)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-K`` of ``output_dir`` with the largest K whose saving finished (it holds the run file)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(path.name.rsplit("-", 1)[1]), path) for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if path.name.rsplit("-", 1)[1].isdigit() and (path / RUN_FILE).is_file()]
    return str(max(steps)[1]) if steps else None


def check_resume(checkpoint: str, record: dict[str, Any], num_layers: int | None = None) -> None:
    """Refuse a checkpoint whose run differs from ``record`` in what it trains or how IST selects.

    Args:
        num_layers: N_L of the model about to load, when known from its config.
    """
    folder = Path(checkpoint)
    if not (folder / RUN_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint={checkpoint!r} has no {RUN_FILE}: its saving was cut short, or "
                         "`istune train` did not save it. Resume from an earlier checkpoint (or "
                         "--resume_from_checkpoint true for the latest complete one); a checkpoint of your own "
                         "script resumes with trainer.train(resume_from_checkpoint=...).")
    saved = json.loads((folder / RUN_FILE).read_text())
    differences = []
    defaults = {"ist": ISTConfig().to_dict()}  # a run file written before an option existed had its default
    for group, names in must_match().items():
        for name in names:
            old = saved.get(group, {}).get(name, defaults.get(group, {}).get(name))
            new = record.get(group, {}).get(name)
            if json.loads(json.dumps(new, default=str)) != old:
                differences.append(f"--{name}={new!r} (checkpoint: {old!r})")
    state = json.loads((folder / "trainer_state.json").read_text()).get("stateful_callbacks", {}).get("istune", {})
    if num_layers is not None and state.get("num_layers") not in (None, num_layers):
        differences.append(f"N_L={num_layers} layers (checkpoint: {state['num_layers']})")
    if differences:
        raise ValueError(f"--resume_from_checkpoint={checkpoint!r} was saved by another run: "
                         f"{'; '.join(differences)}. Resume with the options it was trained with, or drop "
                         "--resume_from_checkpoint to start a new run in another --output_dir.")
