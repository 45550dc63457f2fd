"""The fine-tuning recipe behind `istune train`: data, adapters, Trainer with IST, saving, evaluation.

    istune train                                   # embedded default: SmolLM2-135M, LoRA+IST, commonsense slice
    istune train --strategy all --output_dir runs/lora   # the same run as plain LoRA

The options and the checks that run before the model loads are in :mod:`istune.recipe.job_checks`.
Under a launcher (torchrun, accelerate) every process trains; only the main one writes and
evaluates. The output folder gets the adapters (``adapter/``), the IST log (``ist_log.jsonl``),
the run's options and state (``istune_run.json``, also in every checkpoint) and the evaluation
(``results.json``); every file is written whole or not at all, in the order
:mod:`istune.recipe.run_file` describes, so ``--resume_from_checkpoint true`` finishes a run
whose evaluation was cut short without training again, and recognises a complete run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from istune.adapters.methods import AdapterArgs, add_adapters, load_adapters, save_adapters
from istune.config import ISTConfig
from istune.data import load_eval_items
from istune.io import atomic_dir, repo_relative, write_text
from istune.models import ModelArgs, load_model_and_tokenizer, loading_kwargs
from istune.recipe import run_file
from istune.recipe.job_checks import check_job, run_record
from istune.runs import RunArgs, batch_layout, load_rows, saved_training_value

# What results.json holds from the training, in its order; istune_run.json keeps it once training ends.
TRAINING_RESULTS = ("training", "batch_layout", "train_seconds", "importance", "log_history", "curve")


def train(run: RunArgs, adapter: AdapterArgs, ist: ISTConfig, training=None,
          model_args: ModelArgs | None = None) -> dict[str, Any]:
    """Run the whole recipe and return the results (also written to ``output_dir/results.json``).

    With ``--resume_from_checkpoint true`` on an output folder whose training finished, the
    saved adapters are evaluated (nothing trains again); on a complete run it says so and
    returns the saved results.

    Args:
        training: the Trainer's options (``TrainingArguments``); default
            :class:`~istune.recipe.training_args.RecipeTrainingArguments`, the main job's.
        model_args: how the model loads; default float32 on CPU, bfloat16 on a GPU that has it.
    """
    from transformers import Trainer, set_seed

    from istune.data import CausalLMCollator, InstructionDataset
    from istune.integrations.hf import add_ist
    from istune.recipe.training_args import RecipeTrainingArguments

    started = time.time()
    training = training if training is not None else RecipeTrainingArguments()
    model_args = model_args if model_args is not None else ModelArgs()
    tasks, resume, state = check_job(run, model_args, adapter, ist, training)
    main = training.process_index == 0  # under a launcher only the main process writes, prints and evaluates
    output = Path(training.output_dir)
    if state == run_file.COMPLETE:
        if main:
            print(f"istune train: {output} holds a complete run; its results are in "
                  f"{output / run_file.RESULTS_FILE}")
        return json.loads((output / run_file.RESULTS_FILE).read_text())
    if state == run_file.TRAINED:
        return finish_evaluation(run, model_args, adapter, ist, training, tasks) if main else {}
    say = print if main else (lambda *args, **kwargs: None)
    set_seed(training.seed)  # data sample, adapter initialisation and the Trainer; IST has its own seed
    with training.main_process_first(desc="data"):
        train_rows, heldout_rows = load_rows(run, training.seed)
        items = load_eval_items(tasks, run.eval_limit, run.eval_seed) if main else {}
    load = loading_kwargs(model_args, training.local_process_index)
    with training.main_process_first(desc="model"):
        model, tokenizer = load_model_and_tokenizer(run.model, **load)
    train_set = InstructionDataset(train_rows, tokenizer, run.cutoff_len, run.train_on_inputs)
    heldout_set = InstructionDataset(heldout_rows, tokenizer, run.cutoff_len, train_on_inputs=False)
    say(f"istune: {run.model} ({load['dtype']}{', ' + _quantization(model_args) if model_args.quantized else ''}) | "
        f"{len(train_rows)} training examples, {len(heldout_rows)} held out | "
        f"eval: {', '.join(tasks) or 'none'} x {run.eval_limit or 'all'}")

    record = run_record(run, model_args, adapter, ist)
    if model_args.quantized:
        model = _prepare_quantized(model, training)
    layout = batch_layout(run, model, training, say)  # after keep_quantized_layers_trainable: it runs eval forwards
    collate = CausalLMCollator(tokenizer, **layout)
    model = add_adapters(model, adapter, total_steps=_total_steps(training, len(train_set)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"istune: {adapter.method} adapters, {trainable:,} trainable of {total:,} parameters; "
        f"strategy {ist.strategy!r}")
    curve = (AccuracyCurve(tokenizer, items, run, training.per_device_eval_batch_size)
             if run.curve_every and main and items else None)  # the main process evaluates, as after training
    callbacks = [run_file.RunFileCallback(record), *([curve] if curve else [])]
    trainer = Trainer(model=model, args=training, train_dataset=train_set, eval_dataset=heldout_set,
                      data_collator=collate, callbacks=callbacks)
    callback = add_ist(trainer, ist)  # with the Trainer: reporters get IST metrics, FSDP2 checkpoints every adapter
    train_started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    results: dict[str, Any] = {**record, "training": _training_record(training),
                               "batch_layout": layout, "train_seconds": time.time() - train_started,
                               "importance": callback.importance.tolist(),
                               "log_history": trainer.state.log_history,
                               "curve": curve.record(trainer.state.global_step) if curve else None}
    if not main:
        return results
    with atomic_dir(output / run_file.ADAPTER_FOLDER, replace=True) as folder:
        save_adapters(model, folder, adapter)
    training_results = {name: results[name] for name in TRAINING_RESULTS}
    run_file.write_run_file(output, {**record, "state": run_file.TRAINED, "training_results": training_results,
                                        "seconds_until_trained": time.time() - started})

    say("istune: evaluating the tuned model")
    results["tuned"] = _evaluate(model.eval(), tokenizer, items, heldout_set, collate, run,
                                 training.per_device_eval_batch_size)
    _end_curve(results)
    del trainer, model, callback
    return _finish(results, tokenizer, items, heldout_set, collate, run, training.per_device_eval_batch_size, load,
                   output, seconds=time.time() - started)


def finish_evaluation(run: RunArgs, model_args: ModelArgs, adapter: AdapterArgs, ist: ISTConfig, training,
                      tasks: list[str]) -> dict[str, Any]:
    """Evaluate the saved adapters of a run whose training finished (state ``"trained"``), as the run itself
    would have right after training, and write its ``results.json``."""
    from istune.data import CausalLMCollator, InstructionDataset

    started = time.time()
    output = Path(training.output_dir)
    saved = run_file.read_run_file(output)
    trained = saved["training_results"]
    print(f"istune: {output} holds a trained run whose evaluation was cut short; evaluating its adapters "
          "(nothing trains again)")
    _, heldout_rows = load_rows(run, saved_training_value(trained, "seed"))
    items = load_eval_items(tasks, run.eval_limit, run.eval_seed)
    load = loading_kwargs(model_args, training.local_process_index)
    model, tokenizer = load_model_and_tokenizer(run.model, **load)
    heldout_set = InstructionDataset(heldout_rows, tokenizer, run.cutoff_len, train_on_inputs=False)
    if model_args.quantized:
        model = _prepare_quantized(model, training)  # the same layers in float32 as during training
    layout = trained["batch_layout"]
    if layout["padding_free"]:
        model.config.use_cache = False  # as batch_layout() set it for the training
    collate = CausalLMCollator(tokenizer, **layout)
    model = load_adapters(model, output / run_file.ADAPTER_FOLDER)
    results: dict[str, Any] = {**run_record(run, model_args, adapter, ist), **trained}
    batch_size = saved_training_value(trained, "per_device_eval_batch_size")
    print("istune: evaluating the tuned model")
    results["tuned"] = _evaluate(model.eval(), tokenizer, items, heldout_set, collate, run, batch_size)
    _end_curve(results)
    del model
    seconds = saved.get("seconds_until_trained", 0) + time.time() - started
    return _finish(results, tokenizer, items, heldout_set, collate, run, batch_size, load, output, seconds=seconds)


class AccuracyCurve(TrainerCallback):
    """The accuracy on the run's evaluation items at step 0 and every ``--curve_every`` steps (a learning curve).

    The last point, at the final step, is the tuned model's evaluation itself (``_end_curve``), so it is
    not measured twice. ``seconds`` is the time the points took, inside the Trainer's training time.
    """

    def __init__(self, tokenizer, items: dict[str, list[dict]], run: RunArgs, batch_size: int):
        self.tokenizer, self.items, self.run, self.batch_size = tokenizer, items, run, batch_size
        self.points: list[dict[str, float]] = []
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._measure(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.run.curve_every == 0 and state.global_step < state.max_steps:
            self._measure(state.global_step, model)

    def _measure(self, step: int, model) -> None:
        from istune.eval.cached import evaluate_model

        started = time.time()
        result = evaluate_model(model, self.tokenizer, self.items, None, None, self.run.eval_method, self.batch_size,
                                generation_batch_size=self.run.generation_batch_size)
        self.points.append({"step": step, **{method: result[method]["average"] for method in result}})
        self.seconds += time.time() - started

    def record(self, final_step: int) -> dict[str, Any]:
        return {"every": self.run.curve_every, "points": self.points, "seconds": self.seconds,
                "final_step": final_step}


def _end_curve(results: dict[str, Any]) -> None:
    """The curve's last point: the tuned model's accuracy at the final step."""
    curve = results.get("curve")
    if curve:
        methods = {m: results["tuned"][m]["average"] for m in ("generate", "score") if m in results["tuned"]}
        curve["points"] = [p for p in curve["points"] if p["step"] < curve["final_step"]]
        curve["points"].append({"step": curve["final_step"], **methods})


def train_run(run: RunArgs, adapter: AdapterArgs, ist: ISTConfig, **training_options) -> dict[str, Any]:
    """:func:`train` with ``RecipeTrainingArguments(**training_options)``: how the analyses, below the recipe,
    train (``istune.cli`` hands them this function)."""
    from istune.recipe.training_args import RecipeTrainingArguments

    return train(run, adapter, ist, RecipeTrainingArguments(**training_options))


def _evaluate(model, tokenizer, items: dict[str, list[dict]], heldout, collate, run: RunArgs,
              batch_size: int) -> dict[str, Any]:
    """The tuned model's held-out loss and accuracy (uncached: its adapters are new)."""
    from istune.eval.cached import evaluate_model

    return evaluate_model(model, tokenizer, items, heldout, collate, run.eval_method, batch_size,
                          generation_batch_size=run.generation_batch_size)


def _finish(results: dict[str, Any], tokenizer, items, heldout, collate, run: RunArgs, batch_size: int,
            load: dict[str, Any], output: Path, seconds: float) -> dict[str, Any]:
    """Evaluate the base model (if asked), then write ``results.json`` and mark the run evaluated."""
    from istune.eval.cached import evaluate_base

    started = time.time()
    if run.compare_base:  # cached by (model files, items, method): a repeated run does not recompute it
        _free_memory()
        base, _ = load_model_and_tokenizer(run.model, **load)
        results["base"] = evaluate_base(base.eval(), tokenizer, items, heldout, collate, method=run.eval_method,
                                        batch_size=batch_size, model_name=run.model,
                                        generation_batch_size=run.generation_batch_size)
    results["total_seconds"] = seconds + time.time() - started
    write_text(output / run_file.RESULTS_FILE, json.dumps(results, indent=2))
    saved = run_file.read_run_file(output)
    run_file.write_run_file(output, {**saved, "state": run_file.EVALUATED})
    print(format_results(results))
    return results


def _prepare_quantized(model, training):
    """QLoRA: keep the quantized layers trainable, then peft's preparation (float32 norms, input gradients)."""
    from peft import prepare_model_for_kbit_training

    from istune.core.probe import keep_quantized_layers_trainable

    keep_quantized_layers_trainable(model)  # before any evaluation: bitsandbytes' CPU repacking drops gradients
    # Checkpointing only if asked (--activation_checkpointing, alias --gradient_checkpointing), non-reentrant
    # unless told otherwise (DDP needs it).
    checkpointing = training.gradient_checkpointing or getattr(training, "activation_checkpointing", False)
    kwargs = training.gradient_checkpointing_kwargs or getattr(training, "activation_checkpointing_kwargs", None)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                           gradient_checkpointing_kwargs=kwargs or {"use_reentrant": False})


def _total_steps(training, train_examples: int) -> int:
    """Optimizer steps of the run: --max_steps, or the epochs' steps over all processes."""
    if training.max_steps > 0:
        return training.max_steps
    per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size
    return max(1, math.ceil(train_examples / per_step * training.num_train_epochs))


def _quantization(model_args: ModelArgs) -> str:
    return "4-bit NF4" if model_args.load_in_4bit else "8-bit"


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _training_record(training) -> dict[str, Any]:
    """The Trainer's options as results.json keeps them: its folders relative to the repository holding them."""
    values = _jsonable(training.to_dict())
    for name in ("output_dir", "logging_dir"):
        if values.get(name):
            values[name] = repo_relative(values[name])
    return values


def format_results(results: dict[str, Any]) -> str:
    """Base vs tuned: per-task accuracy for each evaluation method, the average and the held-out loss."""
    runs = [name for name in ("base", "tuned") if name in results]
    lines = []
    for method, title in (("generate", "generation accuracy (%)"), ("score", "option-scoring accuracy (%)")):
        if not any(method in results[name] for name in runs):
            continue
        tasks = list(results[runs[-1]][method]["tasks"])
        lines.append(f"\n{title}")
        lines.append(f"{'task':<14}" + "".join(f"{name:>10}" for name in runs))
        for task in tasks + ["average"]:
            values = [results[n][method]["average"] if task == "average" else results[n][method]["tasks"][task]
                      for n in runs]
            lines.append(f"{task:<14}" + "".join(f"{100 * v:>10.1f}" for v in values))
    lines.append(f"\n{'held-out loss':<14}" + "".join(f"{results[n]['heldout_loss']:>10.4f}" for n in runs))
    if "train_seconds" in results:
        lines.append(f"training {results['train_seconds']:.0f} s, whole run {results.get('total_seconds', 0):.0f} s")
    return "\n".join(lines)
