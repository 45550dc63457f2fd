"""Tests of istune.planning: the memory tracker, row specifications, shapes, kernels, worst cases and the
planner."""
