"""`istune eval RUN_DIR`: evaluate the adapters of a finished run again, on the same held-out data and items."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional


def evaluate_run(run_dir: str, tasks: Optional[str] = None, limit: Optional[int] = None,
                 method: Optional[str] = None) -> dict:
    """Load base model + adapters from ``run_dir``, evaluate, write ``eval.json`` there and print the table."""
    from istune.data import CausalLMCollator, InstructionDataset
    from istune.recipe.methods import load_adapters
    from istune.recipe.models import load_model_and_tokenizer
    from istune.recipe.models import ModelArgs, loading_kwargs
    from istune.recipe.train import (RunArgs, check_run, evaluate, format_results, load_eval_items, load_rows,
                                     saved_training_value, write_json)

    folder = Path(run_dir)
    results_file = folder / "results.json"
    if not results_file.is_file() or not (folder / "adapter").is_dir():
        raise FileNotFoundError(f"{folder} is not the output folder of `istune train` (needs results.json and adapter/).")
    saved = json.loads(results_file.read_text())
    overrides = {k: v for k, v in {"eval_tasks": tasks, "eval_limit": limit, "eval_method": method}.items() if v is not None}
    run = dataclasses.replace(RunArgs.from_saved(saved["run"]), overwrite=True, **overrides)
    from istune.config import ISTConfig
    from istune.recipe.methods import AdapterArgs

    task_names = check_run(run, AdapterArgs(**saved["adapter"]), ISTConfig(**saved["ist"]))
    _, heldout_rows = load_rows(run, saved_training_value(saved, "seed"))
    items = load_eval_items(task_names, run.eval_limit, run.eval_seed)
    base, tokenizer = load_model_and_tokenizer(run.model, **loading_kwargs(ModelArgs(**saved.get("model_loading", {}))))
    model = load_adapters(base, folder / "adapter").eval()
    heldout = InstructionDataset(heldout_rows, tokenizer, run.cutoff_len, train_on_inputs=False)
    batch_size = saved_training_value(saved, "per_device_eval_batch_size", 8)
    results = {"run": saved["run"],
               "tuned": evaluate(model, tokenizer, items, heldout, CausalLMCollator(tokenizer), run, batch_size)}
    write_json(folder / "eval.json", results)
    print(format_results(results))
    return results
