"""TaskResult: the outcome of evaluating one task with one method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """Accuracy of one task under one method, with the per-item records behind it.

    Attributes:
        task: Task name as given by the caller.
        method: ``"generate"`` (generate, then extract the answer) or
            ``"score"`` (pick the option of highest log-likelihood).
        correct: Number of items answered correctly.
        total: Number of items evaluated.
        records: One dict per item, in input order.
        metrics: Further accuracies of the same method (e.g. length-normalized scoring).
    """

    task: str
    method: str
    correct: int
    total: int
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Fraction correct, in [0, 1]; 0.0 for an empty task."""
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary without the records."""
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, **self.metrics}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the records."""
        return {**asdict(self), "accuracy": self.accuracy}
