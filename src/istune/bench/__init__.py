"""Benchmarks' building blocks: measuring memory of training steps, and the model shapes measured."""

from istune.bench.memory import CATEGORIES, PHASES, MemoryTracker
from istune.bench.shapes import SHAPES, Shape

__all__ = ["CATEGORIES", "PHASES", "SHAPES", "MemoryTracker", "Shape"]
