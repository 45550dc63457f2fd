"""Benchmarks' building blocks: measuring memory of training steps."""

from istune.bench.memory import CATEGORIES, PHASES, MemoryTracker

__all__ = ["CATEGORIES", "PHASES", "MemoryTracker"]
