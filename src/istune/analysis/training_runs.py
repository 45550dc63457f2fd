"""Short training runs for the analyses, recorded one file per run so that a sweep resumes.

Every run goes through the same recipe as ``istune train``: the analyses sit below the recipe,
so ``istune.cli`` hands them its training function (:data:`TrainFn`,
:func:`istune.recipe.train.train_run`). Same data sample, data order and adapter initialisation
for a given seed, whatever the strategy, so runs differ only in their ISTConfig. A finished run is saved whole to
``<out>/runs/<name>.json``; a later call skips every run whose file exists, after
checking it was made with the same settings (otherwise it refuses, before any work).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from istune.config import ISTConfig
from istune.io import run_metadata, write_text

RUNS_FOLDER = "runs"
# train(run: RunArgs, adapter: AdapterArgs, ist: ISTConfig, **training_options) -> the results of `istune train`,
# the options those of its TrainingArguments (istune.cli passes istune.recipe.train.train_run).
TrainFn = Callable[..., dict]


@dataclass
class TrainingSize:
    """How big each training run of an analysis is (the same for every run of one call)."""

    model: str = field(
        default="smollm2-135m", metadata={"help": "Hub id, local path, or 'smollm2-135m' (embedded, offline)."}
    )
    data: str = field(
        default="commonsense",
        metadata={"help": "'commonsense' (the packaged 8-task mix) or an LLM-Adapters JSON file."},
    )
    method: str = field(
        default="lora", metadata={"help": "PEFT method whose layers are selected (lora, dora, series, parallel, ...)."}
    )
    rank: int = field(default=32, metadata={"help": "LoRA rank r (alpha = 2r, as in the paper)."})
    max_steps: int = field(
        default=100,
        metadata={"help": "Optimizer steps per run (SmolLM2-135M: about 5 s each on 2 idle CPU cores at batch 4)."},
    )
    batch_size: int = field(default=4, metadata={"help": "Examples per optimizer step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (linear decay)."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example."})
    heldout_samples: int = field(
        default=64, metadata={"help": "Examples held out from the training mix for the held-out answer loss."}
    )
    eval_limit: int = field(
        default=0,
        metadata={"help": "Option-scoring accuracy on this many items per commonsense task "
                  "(0: no accuracy, loss only)."},
    )
    eval_tasks: str = field(
        default="all",
        metadata={"help": "Commonsense tasks of the accuracy ('all' or comma-separated), when eval_limit is above 0."},
    )

    def run_args(self):
        """The :class:`istune.runs.RunArgs` of one run of this size."""
        from istune.runs import RunArgs

        return RunArgs(
            model=self.model, data=self.data, train_samples=self.max_steps * self.batch_size,
            heldout_samples=self.heldout_samples, overwrite=True, cutoff_len=self.cutoff_len,
            eval_tasks=self.eval_tasks if self.eval_limit > 0 else "none", eval_limit=self.eval_limit or None,
            eval_method="score", compare_base=False,
        )

    def training_options(self, output_dir: Path, seed: int) -> dict[str, Any]:
        """The Trainer's options of one run of this size (the main job's for the others)."""
        return dict(output_dir=str(output_dir), max_steps=self.max_steps, per_device_train_batch_size=self.batch_size,
                    learning_rate=self.learning_rate, logging_steps=self.max_steps, seed=seed)

    def adapter_args(self):
        from istune.adapters.methods import AdapterArgs

        return AdapterArgs(method=self.method, rank=self.rank, alpha=2 * self.rank)


@dataclass
class PlannedRun:
    """One training run of an analysis: its file name, its ISTConfig, and what it stands for in the report."""

    name: str
    ist: ISTConfig
    labels: dict[str, Any] = field(default_factory=dict)


def check_size(size: TrainingSize) -> None:
    """Refuse bad sizes (with the option, the value and the fix) before anything is loaded."""
    from istune.option_checks import require_at_least_one
    from istune.runs import check_run

    require_at_least_one(size, ("max_steps", "batch_size"))
    if size.learning_rate <= 0:
        raise ValueError(f"--learning_rate={size.learning_rate!r} must be positive.")
    if size.eval_limit < 0:
        raise ValueError(f"--eval_limit={size.eval_limit} must be 0 (no accuracy) or a number of items per task.")
    check_run(size.run_args())
    size.adapter_args()  # AdapterArgs checks the method and its sizes when built


def count_adapter_layers(size: TrainingSize) -> int:
    """N_L of ``size.model`` with ``size.method`` adapters (loads the model once, trains nothing)."""
    from istune.adapters.methods import add_adapters
    from istune.core.layers import find_adapter_layers
    from istune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(size.model)
    return len(find_adapter_layers(add_adapters(model, size.adapter_args(), total_steps=size.max_steps)))


def run_path(out: Path, name: str) -> Path:
    return out / RUNS_FOLDER / f"{name}.json"


def check_finished_runs(planned: Sequence[PlannedRun], size: TrainingSize, out: Path) -> None:
    """Refuse when a saved run of the same name was made with other settings (it would be silently mixed in)."""
    wanted = json.loads(json.dumps(asdict(size)))
    # A field added to TrainingSize or ISTConfig after a run was saved counts as its default there.
    size_defaults = json.loads(json.dumps(asdict(TrainingSize())))
    ist_defaults = ISTConfig().to_dict()
    for run in planned:
        path = run_path(out, run.name)
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        saved_size = {**size_defaults, **saved.get("settings", {})}
        changed = {k: (saved_size.get(k), v) for k, v in wanted.items() if saved_size.get(k) != v}
        ist = json.loads(json.dumps(run.ist.to_dict()))
        saved_ist = {**ist_defaults, **saved.get("ist", {})}
        changed |= {f"ist.{k}": (saved_ist.get(k), v) for k, v in ist.items() if saved_ist.get(k) != v}
        if changed:
            shown = ", ".join(f"--{k}={new!r} (saved: {old!r})" for k, (old, new) in list(changed.items())[:4])
            raise ValueError(f"{path} was made with other settings than now: {shown}. Give the same options to "
                             f"resume, or a new --out folder (or delete {path}) to start afresh.")


def run_all(planned: Sequence[PlannedRun], size: TrainingSize, out: Path, *, command: str, argv: Sequence[str],
            train: TrainFn, keep_adapters: bool = False) -> dict[str, dict]:
    """Train every planned run that has no record yet (with ``train``); return all records by name.

    Each finished run is written to ``<out>/runs/<name>.json`` at once (whole or not at
    all). A run trains in ``<out>/runs/<name>.work/``, which is removed afterwards, or
    renamed to ``<out>/runs/<name>/`` (adapters, IST log) with ``keep_adapters``.
    """
    check_finished_runs(planned, size, out)
    records = {}
    todo = [run for run in planned if not run_path(out, run.name).is_file()]
    print(f"istune analyze {command}: {len(planned) - len(todo)} of {len(planned)} runs already done in {out}",
          flush=True)
    for number, run in enumerate(planned, 1):
        path = run_path(out, run.name)
        if not path.is_file():
            print(f"== run {number}/{len(planned)}: {run.name}", flush=True)
            record = _train_one(run, size, out, command, argv, train, keep_adapters)
            write_text(path, json.dumps(record, indent=1))
        records[run.name] = json.loads(path.read_text())
    return records


def _train_one(run: PlannedRun, size: TrainingSize, out: Path, command: str, argv: Sequence[str], train: TrainFn,
               keep_adapters: bool) -> dict:
    work = out / RUNS_FOLDER / f"{run.name}.work"
    shutil.rmtree(work, ignore_errors=True)  # left by an interrupted call
    try:
        # One seed for the data sample, the Trainer and IST, as before TrainingArguments had its own.
        results = train(size.run_args(), size.adapter_args(), run.ist, **size.training_options(work, run.ist.seed))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    kept: str | None = None
    if keep_adapters:
        final = out / RUNS_FOLDER / run.name
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        kept = str(final)
    else:
        shutil.rmtree(work, ignore_errors=True)
    tuned = results["tuned"]
    return {
        "name": run.name, "labels": run.labels, "ist": run.ist.to_dict(), "settings": asdict(size),
        "heldout_loss": tuned["heldout_loss"],
        "score_accuracy": tuned["score"]["average"] if "score" in tuned else None,
        "score_tasks": tuned["score"]["tasks"] if "score" in tuned else None,
        "importance": results["importance"], "train_seconds": results["train_seconds"],
        "run_folder": kept,
        "metadata": run_metadata(f"-m istune analyze {command}", list(argv), repo_root()),
    }


def size_from_options(options) -> TrainingSize:
    """A TrainingSize from an argparse namespace holding its fields (see :func:`add_size_options`)."""
    return TrainingSize(**{f.name: getattr(options, f.name) for f in dataclasses.fields(TrainingSize)})


def add_size_options(parser, defaults: TrainingSize | None = None) -> None:
    """One option per TrainingSize field, with its help text and default."""
    defaults = defaults or TrainingSize()
    group = parser.add_argument_group("size of each training run")
    for f in dataclasses.fields(TrainingSize):
        default = getattr(defaults, f.name)
        group.add_argument(f"--{f.name}", type=type(default), default=default,
                           help=f"{f.metadata['help']} Default: {default}.")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]
