"""Benchmarks' building blocks: measuring memory of training steps, and the model shapes measured."""

from istune.planning.shapes import SHAPES, Shape
from istune.planning.tracker import CATEGORIES, PHASES, MemoryTracker

__all__ = ["CATEGORIES", "PHASES", "SHAPES", "MemoryTracker", "Shape"]
