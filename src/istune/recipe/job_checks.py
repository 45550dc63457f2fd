"""The options of ``istune train`` and every check that runs before the model loads.

The options come in five dataclasses, each beside what it configures: :class:`~istune.runs.RunArgs`
(data and evaluation), :class:`~istune.models.ModelArgs` (how the model loads),
:class:`~istune.adapters.methods.AdapterArgs` (the PEFT method), :class:`~istune.config.ISTConfig`
and the Trainer's own arguments (:class:`~istune.recipe.training_args.RecipeTrainingArguments`).
:func:`check_job` checks them together, and the output folder: what it holds decides whether
the run starts, resumes training from a checkpoint, finishes an evaluation that was cut short,
or has nothing left to do (see :mod:`istune.recipe.run_file`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from istune.adapters.methods import AdapterArgs
from istune.config import ISTConfig
from istune.models import ModelArgs
from istune.option_checks import require_at_least_one
from istune.recipe import run_file
from istune.runs import RunArgs, check_run


def run_record(run: RunArgs, model_args: ModelArgs, adapter: AdapterArgs, ist: ISTConfig) -> dict[str, Any]:
    """istune's options of a run, as ``istune_run.json`` and results.json keep them."""
    return {"run": asdict(run), "model_loading": asdict(model_args), "adapter": asdict(adapter), "ist": ist.to_dict()}


def check_model_args(args: ModelArgs, method: str) -> None:
    """Refuse loading options that cannot train (before anything is loaded)."""
    if not args.quantized:
        return
    flag = "--load_in_4bit" if args.load_in_4bit else "--load_in_8bit"
    if method == "full":
        raise ValueError(f"{flag}=True with --method=full: whole layers cannot train on quantized weights; use "
                         "--method lora, dora or adalora (QLoRA), or drop " + flag + ".")
    if method in ("series", "parallel"):
        raise ValueError(f"{flag}=True with --method={method}: the Trainer fine-tunes quantized models only through "
                         "peft adapters; use --method lora, dora or adalora, or drop " + flag + ".")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag}=True needs bitsandbytes; run `pip install bitsandbytes==0.50.2` "
                         "(see requirements.txt).")


def check_job(run: RunArgs, model_args: ModelArgs, adapter: AdapterArgs, ist: ISTConfig,
              training) -> tuple[list[str], str | None, str | None]:
    """Everything that can be checked before the model loads.

    Returns:
        ``(eval tasks, checkpoint to resume training from, state)``: ``state`` is None for a run
        that trains, ``"trained"`` for one whose evaluation is to be finished, ``"complete"`` for
        one with nothing left to do (both only with ``--resume_from_checkpoint true``).
    """
    tasks = check_run(run)
    require_at_least_one(training, ("per_device_train_batch_size", "per_device_eval_batch_size",
                                    "gradient_accumulation_steps"))
    if training.max_steps == 0 or (training.max_steps < 0 and training.num_train_epochs <= 0):
        raise ValueError(f"--max_steps={training.max_steps!r} must be at least 1, or -1 with --num_train_epochs "
                         "above 0.")
    if training.learning_rate <= 0:
        raise ValueError(f"--learning_rate={training.learning_rate!r} must be positive.")
    check_model_args(model_args, adapter.method)
    check_output_dir(training.output_dir)
    record = run_record(run, model_args, adapter, ist)
    state = None if run.overwrite else run_file.run_state(training.output_dir)
    resume_latest = str(training.resume_from_checkpoint).lower() == "true"
    if state in (run_file.TRAINED, run_file.COMPLETE) and resume_latest:
        run_file.check_same_run(training.output_dir, record)
        return tasks, None, state
    if state is not None and not (state == run_file.PARTIAL and resume_latest):
        raise ValueError(_holds_a_run(training.output_dir, state))
    resume = run_file.resolve_resume(training.resume_from_checkpoint, training.output_dir)
    if resume is not None:
        run_file.check_resume(resume, record, _num_layers(run.model))
    return tasks, resume, None


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output_dir that cannot be created or written (a file on its path, no write permission)."""
    path = Path(output_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"--output_dir={output_dir!r} cannot be created: {str(existing)!r} is a file, not a folder; "
                         "choose another --output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir={output_dir!r} cannot be written: no write permission in {str(existing)!r}; "
                         "choose another --output_dir.")


def _holds_a_run(output_dir: str, state: str) -> str:
    """The refusal for an --output_dir that holds a run, with the advice that fits how far it got."""
    start = f"--output_dir={output_dir!r} already holds a run"
    if state == run_file.COMPLETE:
        return f"{start} ({Path(output_dir) / run_file.RESULTS_FILE}); choose another folder or pass --overwrite."
    if state == run_file.TRAINED:
        return (f"{start} whose training finished and whose evaluation did not; pass --resume_from_checkpoint true "
                "to finish its evaluation (it does not train again), or choose another folder.")
    if run_file.latest_complete_checkpoint(output_dir) is not None:
        return (f"{start} whose saving was cut short; pass --resume_from_checkpoint true to resume it from its latest "
                "checkpoint, or choose another folder.")
    return (f"{start} whose saving was cut short and which has no checkpoint to resume from; choose another folder "
            "or pass --overwrite to train it again.")


def _num_layers(model: str) -> int | None:
    """N_L from the model's config when it is a local folder (no download, no conversion); else None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    return values.get("num_hidden_layers", values.get("n_layer"))
