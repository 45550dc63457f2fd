"""The run record that ``istune train`` keeps in its checkpoints, and the resume check.

``istune_run.json`` (the run's istune options: data, model loading, PEFT method, IST) is
written into every ``checkpoint-K`` the Trainer saves, after the Trainer's own files, and into
the finished output folder. A checkpoint without it is one whose saving was cut short:
``--resume_from_checkpoint true`` passes over it. ``--resume_from_checkpoint`` is compared with it before the model loads:
a checkpoint of another model, PEFT method, adapter shape or IST strategy is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

RUN_FILE = "istune_run.json"
# What must match for a checkpoint to resume: the parameters it holds and how IST selects from them.
MUST_MATCH = {
    "run": ("model",),
    "adapter": ("method", "rank", "target_modules", "bottleneck_size"),
    "ist": ("strategy", "update_fraction", "update_layers"),
    "model_loading": ("load_in_4bit", "load_in_8bit"),
}


def write_run_file(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``record`` as ``folder/istune_run.json``, whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, folder / RUN_FILE)


class RunFileCallback(TrainerCallback):
    """Writes the run record into every checkpoint the Trainer saves (main process)."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_run_file(checkpoint, self.record)


def resolve_resume(value: Optional[str], output_dir: str) -> Optional[str]:
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


def latest_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The ``checkpoint-K`` of ``output_dir`` with the largest K whose saving finished (it holds the run file)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(path.name.rsplit("-", 1)[1]), path) for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if path.name.rsplit("-", 1)[1].isdigit() and (path / RUN_FILE).is_file()]
    return str(max(steps)[1]) if steps else None


def check_resume(checkpoint: str, record: dict[str, Any], num_layers: Optional[int] = None) -> None:
    """Refuse a checkpoint whose run differs from ``record`` in what it trains or how IST selects.

    Args:
        num_layers: N_L of the model about to load, when known from its config.
    """
    folder = Path(checkpoint)
    if not (folder / RUN_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint={checkpoint!r} has no {RUN_FILE}: its saving was cut short, or "
                         "`istune train` did not save it. Resume from an earlier checkpoint (or --resume_from_checkpoint "
                         "true for the latest complete one); a checkpoint of your own script resumes with "
                         "trainer.train(resume_from_checkpoint=...).")
    saved = json.loads((folder / RUN_FILE).read_text())
    differences = [f"--{name}={record.get(group, {}).get(name)!r} (checkpoint: {saved.get(group, {}).get(name)!r})"
                   for group, names in MUST_MATCH.items() for name in names
                   if record.get(group, {}).get(name) != saved.get(group, {}).get(name)]
    state = json.loads((folder / "trainer_state.json").read_text()).get("stateful_callbacks", {}).get("istune", {})
    if num_layers is not None and state.get("num_layers") not in (None, num_layers):
        differences.append(f"N_L={num_layers} layers (checkpoint: {state['num_layers']})")
    if differences:
        raise ValueError(f"--resume_from_checkpoint={checkpoint!r} was saved by another run: "
                         f"{'; '.join(differences)}. Resume with the options it was trained with, or drop "
                         "--resume_from_checkpoint to start a new run in another --output_dir.")
