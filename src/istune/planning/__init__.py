"""Planning a run's memory without its weights: the meta-device tracker, the kernels' stand-ins, the row
specification, the measured step and the planner (``istune plan``). The benchmarks in ``istune.bench`` build on it.
"""

from istune.planning.planner import PlanSettings, plan, predict, predict_recipe
from istune.planning.rows import ROWS, Row
from istune.planning.tracker import CATEGORIES, PHASES, MemoryTracker

__all__ = ["CATEGORIES", "PHASES", "ROWS", "MemoryTracker", "PlanSettings", "Row", "plan", "predict",
           "predict_recipe"]
