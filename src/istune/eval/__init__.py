"""Evaluation: answer extraction, generation and option-scoring evaluation.

Example::

    from istune.eval import evaluate_tasks

    results = evaluate_tasks(model, tokenizer, {"piqa": items}, method=["generate", "score"], limit=100)
    print({method: block["average"] for method, block in results.items()})
"""

from istune.eval.answers import extract_answer, is_correct, normalize_task
from istune.eval.generation import evaluate_generation, generate_responses
from istune.eval.prompt import alpaca_prompt, default_prompt
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
    "generate_responses",
    "is_correct",
    "normalize_task",
    "option_logprobs",
]
