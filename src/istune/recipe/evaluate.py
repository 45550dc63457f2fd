"""`istune eval` on a run folder or on any model and adapter (the evaluation itself, cached or not, is
:mod:`istune.eval.cached`).

    istune eval runs/istune                                    # the run's adapters, on the run's items
    istune eval --model smollm2-135m --eval_limit 50           # a bare model; its results are cached
    istune eval --model smollm2-135m --adapter runs/istune/adapter --harness

Every check that needs no model (paths, adapter folders, options) runs before the
model loads. Results files are written whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Any

from istune.eval.cached import evaluate_model, evaluate_parts
from istune.eval.tasks import method_list, parse_eval_tasks
from istune.io import write_text

# ----------------------------------------------------------------------------- istune eval RUN_DIR

def evaluate_run(run_dir: str, tasks: str | None = None, limit: int | None = None,
                 method: str | None = None, batch_size: int | None = None, output: str | None = None,
                 harness: bool = False, generation_batch_size: int | None = None) -> dict:
    """Load base model + adapters from ``run_dir``, evaluate on the run's held-out data and items,
    write ``eval.json`` there (or ``output``) and print the table."""
    from istune.adapters.methods import load_adapters
    from istune.data import CausalLMCollator, InstructionDataset, load_eval_items
    from istune.models import ModelArgs, load_model_and_tokenizer, loading_kwargs
    from istune.recipe.train import format_results
    from istune.runs import RunArgs, check_run, load_rows, saved_training_value

    folder = Path(run_dir)
    results_file = folder / "results.json"
    if not results_file.is_file() or not (folder / "adapter").is_dir():
        raise FileNotFoundError(f"{folder} is not the output folder of `istune train` "
                                "(needs results.json and adapter/).")
    saved = json.loads(results_file.read_text())
    overrides = {k: v for k, v in {"eval_tasks": tasks, "eval_limit": limit, "eval_method": method,
                                   "generation_batch_size": generation_batch_size}.items() if v is not None}
    run = dataclasses.replace(RunArgs.from_saved(saved["run"]), overwrite=True, **overrides)
    task_names = check_run(run)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--eval_batch_size={batch_size!r} must be at least 1.")
    batch_size = batch_size or saved_training_value(saved, "per_device_eval_batch_size", 8)
    out_path = _check_output(output) if output else folder / "eval.json"
    if harness:
        _check_harness(task_names)
    _, heldout_rows = load_rows(run, saved_training_value(saved, "seed"))
    items = load_eval_items(task_names, run.eval_limit, run.eval_seed)
    model_args = ModelArgs(**saved.get("model_loading", {}))
    base, tokenizer = load_model_and_tokenizer(run.model, **loading_kwargs(model_args))
    model = load_adapters(base, folder / "adapter").eval()
    heldout = InstructionDataset(heldout_rows, tokenizer, run.cutoff_len, train_on_inputs=False)
    tuned = evaluate_model(model, tokenizer, items, heldout, CausalLMCollator(tokenizer), run.eval_method, batch_size,
                           generation_batch_size=run.generation_batch_size)
    results: dict[str, Any] = {"run": saved["run"], "tuned": tuned}
    print(format_results(results))
    if harness:
        from istune.eval.harness import run_harness

        results["harness"] = _without_loglikelihoods(run_harness(model, tokenizer, items, batch_size))
        print(format_harness(results["harness"]))
    _write_json(out_path, results)
    print(f"istune eval: wrote {out_path}")
    return results


# ----------------------------------------------------------------------------- istune eval --model

@dataclasses.dataclass
class EvalArgs:
    """``istune eval``'s options: what ``--model`` evaluates and how; on a run folder, the run's own settings
    stand where an option is unset (None)."""

    model: str | None = field(default=None, metadata={
        "help": "Hub id, local folder or 'smollm2-135m': evaluate this model instead of a run."})
    adapter: str | None = field(default=None, metadata={
        "help": "With --model: an adapter folder (a run's adapter/, a run folder, or a peft adapter); without "
                "--model its base model is read from it."})
    eval_tasks: str | None = field(default=None, metadata={
        "help": "Tasks ('all' or comma-separated); default: the run's, or all."})
    eval_limit: int | None = field(default=None, metadata={
        "help": "Items per task (a seeded sample); default: the run's, or the full test sets."})
    eval_seed: int = field(default=0, metadata={
        "help": "Seed of the --eval_limit sample (with --model; a run folder's is the run's). Default: 0."})
    eval_method: str | None = field(default=None, metadata={
        "help": "'generate', 'score' or 'both'; default: the run's, or both."})
    eval_batch_size: int | None = field(default=None, metadata={
        "help": "Sequences per scoring (and held-out loss) pass; default: the run's, or 8."})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "Prompts per generate call; default: the run's, or 32."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights with --model: 'auto' (bfloat16 on a GPU that has it, float32 otherwise), 'bfloat16', "
                "'float16' or 'float32'. Default: auto."})
    output: str | None = field(default=None, metadata={
        "help": "Results JSON; default: <run_dir>/eval.json, none with --model."})
    harness: bool = field(default=False, metadata={
        "help": "Also score with lm-evaluation-harness (lm-eval 0.4.13) on the same items: acc, acc_norm."})
    cache: bool = field(default=True, metadata={
        "help": "With --model alone: reuse cached results of the bare model (--no_cache recomputes them)."})

    def with_model_defaults(self) -> EvalArgs:
        """These options with ``--model``'s defaults where unset (a run folder has its own instead)."""
        unset = {name: value for name, value in MODEL_DEFAULTS.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset)


# `istune eval --model`'s values of the options a run folder takes from its run.
MODEL_DEFAULTS = {"eval_tasks": "all", "eval_method": "both", "eval_batch_size": 8, "generation_batch_size": 32}


@dataclasses.dataclass
class AdapterFolder:
    """A checked adapter folder: ``kind`` is ``"istune"`` (``save_adapters``) or ``"peft"``."""

    path: Path
    kind: str
    base_model: str | None


def find_adapter(path: str) -> AdapterFolder:
    """Check ``--adapter`` before anything loads: an istune ``adapter/`` folder (or a run folder holding
    one) or a peft adapter folder, with the files its kind needs.

    Raises:
        ValueError: Naming the folder, what is missing and what would do.
    """
    from istune.adapters.methods import METHOD_FILE, AdapterArgs
    from istune.adapters.model import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--adapter={path!r}: no such folder; give an adapter folder (a run's adapter/, or a "
                         "peft adapter with adapter_config.json).")
    if not (folder / METHOD_FILE).is_file() and (folder / "adapter" / METHOD_FILE).is_file():
        folder = folder / "adapter"  # a run folder
    if (folder / METHOD_FILE).is_file():
        try:
            args = AdapterArgs(**json.loads((folder / METHOD_FILE).read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"--adapter={path!r}: {folder / METHOD_FILE} is not a valid method file "
                             f"({error}).") from None
        needed = {"series": [CONFIG_NAME, WEIGHTS_NAME], "parallel": [CONFIG_NAME, WEIGHTS_NAME],
                  "full": ["config.json"]}.get(args.method, ["adapter_config.json"])
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"--adapter={path!r}: {args.method} adapters need {missing} in {folder}; "
                             "was the run interrupted before saving?")
        results = folder.parent / "results.json"
        base = json.loads(results.read_text()).get("run", {}).get("model") if results.is_file() else None
        return AdapterFolder(folder, "istune", base)
    if (folder / "adapter_config.json").is_file():
        if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise ValueError(f"--adapter={path!r}: adapter_config.json but no adapter_model.safetensors/.bin "
                             f"in {folder}.")
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return AdapterFolder(folder, "peft", base)
    raise ValueError(f"--adapter={path!r} holds neither {METHOD_FILE} (istune) nor adapter_config.json (peft); "
                     "give a run's adapter/ folder or a peft adapter folder.")


def load_adapter(base_model, adapter: AdapterFolder):
    """``base_model`` with the adapters of ``adapter`` loaded, in inference mode."""
    if adapter.kind == "istune":
        from istune.adapters.methods import load_adapters

        return load_adapters(base_model, adapter.path).eval()
    from istune.adapters.methods import load_peft_adapters

    return load_peft_adapters(base_model, adapter.path).eval()


def check_eval_args(args: EvalArgs) -> tuple[list[str], AdapterFolder | None, str]:
    """Validate ``args`` without loading anything; return (tasks, adapter, model name)."""
    from istune.models import DTYPES

    args = args.with_model_defaults()
    adapter = find_adapter(args.adapter) if args.adapter else None
    model = args.model or (adapter.base_model if adapter else None)
    if not model:
        raise ValueError("--model is required (a hub id, a local folder or 'smollm2-135m'); the adapter does not "
                         "name its base model.")
    local = Path(model).expanduser()
    if (model.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise ValueError(f"--model={model!r}: no such folder; give a model folder, a hub id or 'smollm2-135m'.")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval_limit={args.eval_limit!r} must be at least 1 "
                         "(leave it unset for the full test sets).")
    for name in ("eval_batch_size", "generation_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} must be at least 1.")
    method_list(args.eval_method)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype={args.dtype!r}: use one of {', '.join(DTYPES)}.")
    tasks = parse_eval_tasks(args.eval_tasks)
    if not tasks:
        raise ValueError(f"--eval_tasks={args.eval_tasks!r} leaves nothing to evaluate; name at least one task.")
    if args.output:
        _check_output(args.output)
    if args.harness:
        _check_harness(tasks)
    return tasks, adapter, model


def evaluate_pretrained(args: EvalArgs) -> dict[str, Any]:
    """``istune eval --model``: accuracy of a model (and adapter) on the commonsense items; see ``EvalArgs``."""
    from istune.data import load_eval_items
    from istune.eval.result_cache import ResultCache
    from istune.models import load_model_and_tokenizer, resolve_dtype

    args = args.with_model_defaults()
    tasks, adapter, model_name = check_eval_args(args)
    items = load_eval_items(tasks, args.eval_limit, args.eval_seed)
    dtype = resolve_dtype(args.dtype)  # 'auto': bfloat16 on a GPU that has it, float32 otherwise
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype)
    cache = None
    if adapter is not None:
        model = load_adapter(model, adapter)
    elif args.cache:
        cache = ResultCache.for_model(model, model_name)
    print(f"istune eval: {model_name}" + (f" + {adapter.path}" if adapter else "") +
          f" | {', '.join(tasks)} x {args.eval_limit or 'all'} | {args.eval_method}")
    parts = evaluate_parts(model, tokenizer, items, method_list(args.eval_method), args.eval_batch_size, cache,
                           generation_batch_size=args.generation_batch_size)
    results: dict[str, Any] = {
        "model": model_name, "adapter": str(adapter.path) if adapter else None,
        "dtype": str(dtype).removeprefix("torch."),
        "eval_tasks": tasks, "eval_limit": args.eval_limit, "eval_seed": args.eval_seed,
        "eval_method": args.eval_method,
    }
    for method, summaries in parts.items():
        results[method] = {"tasks": summaries,
                           "average": sum(s["accuracy"] for s in summaries.values()) / len(summaries)}
    if cache is not None:
        results["cache"] = {"hits": cache.hits, "misses": cache.misses, "folder": str(cache.root)}
    if args.harness:
        from istune.eval.harness import run_harness

        results["harness"] = _without_loglikelihoods(run_harness(model, tokenizer, items, args.eval_batch_size))
    print(format_comparison(results))
    if args.output:
        _write_json(Path(args.output), results)
        print(f"istune eval: wrote {args.output}")
    return results


# ----------------------------------------------------------------------------- tables and files

def format_comparison(results: dict[str, Any]) -> str:
    """One row per task: items, generation accuracy, option-scoring accuracy (sum, per char), lm-eval acc/acc_norm."""
    columns = []  # (title, task -> fraction or None)
    if "generate" in results:
        columns.append(("generate", lambda t: results["generate"]["tasks"][t]["accuracy"]))
    if "score" in results:
        columns.append(("score", lambda t: results["score"]["tasks"][t]["accuracy"]))
        columns.append(("score/char", lambda t: results["score"]["tasks"][t]["accuracy_per_char"]))
    if "harness" in results:
        columns.append(("lm-eval acc", lambda t: results["harness"]["tasks"][t]["acc"]))
        columns.append(("lm-eval acc_norm", lambda t: results["harness"]["tasks"][t]["acc_norm"]))
    tasks = results["eval_tasks"]
    count = next(results[m]["tasks"] for m in ("generate", "score", "harness") if m in results)
    lines = ["accuracy (%)", f"{'task':<14}{'n':>6}" + "".join(f"{title:>18}" for title, _ in columns)]
    for task in tasks:
        cells = [get(task) for _, get in columns]
        lines.append(f"{task:<14}{count[task]['total']:>6}" +
                     "".join(f"{'-' if v is None else f'{100 * v:.1f}':>18}" for v in cells))
    averages = []
    for _, get in columns:
        values = [get(task) for task in tasks if get(task) is not None]
        averages.append(sum(values) / len(values) if values else None)
    lines.append(f"{'average':<14}{'':>6}" +
                 "".join(f"{'-' if v is None else f'{100 * v:.1f}':>18}" for v in averages))
    return "\n".join(lines)


def format_harness(harness: dict[str, Any]) -> str:
    """lm-eval's acc and acc_norm per task, in percent."""
    lines = ["\nlm-evaluation-harness (%)", f"{'task':<14}{'n':>6}{'acc':>10}{'acc_norm':>10}"]
    for task, row in harness["tasks"].items():
        norm = "-" if row["acc_norm"] is None else f"{100 * row['acc_norm']:.1f}"
        lines.append(f"{task:<14}{row['total']:>6}{100 * row['acc']:>10.1f}{norm:>10}")
    return "\n".join(lines)


def _without_loglikelihoods(harness: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in harness.items() if key != "loglikelihoods"}


def _check_harness(tasks: list[str]) -> None:
    from istune.eval.harness import check_harness_installed

    try:
        check_harness_installed()
    except ModuleNotFoundError as error:
        raise ValueError(str(error)) from None


def _check_output(output: str) -> Path:
    path = Path(output).expanduser()
    if path.is_dir():
        raise ValueError(f"--output={output!r} is a folder; give a file name such as {path / 'eval.json'}.")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--output={output!r}: {path.parent} is not a folder.")
    return path


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
