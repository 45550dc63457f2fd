"""Evaluation: answer extraction, generation and option-scoring evaluation, reports.

Example::

    from istune.eval import evaluate_tasks, format_table, write_json

    results = evaluate_tasks(model, tokenizer, {"piqa": items}, method=["generate", "score"], limit=100)
    print(format_table(results))
    write_json(results, "outputs/eval.json")
"""

from istune.eval.answers import extract_answer, is_correct, normalize_task
from istune.eval.generation import evaluate_generation, generate_responses
from istune.eval.prompt import alpaca_prompt, default_prompt
from istune.eval.report import format_table, write_json
from istune.eval.result import TaskResult
from istune.eval.runner import evaluate_tasks
from istune.eval.scoring import evaluate_scoring, option_logprobs

__all__ = [
    "TaskResult",
    "alpaca_prompt",
    "default_prompt",
    "evaluate_generation",
    "evaluate_scoring",
    "evaluate_tasks",
    "extract_answer",
    "format_table",
    "generate_responses",
    "is_correct",
    "normalize_task",
    "option_logprobs",
    "write_json",
]
