"""The IST metrics each Trainer log gets: per-layer importance and selection shares, the last probe loss.

    ist/importance/layer_00 .. layer_{N_L-1}   importance I (rules that run importance probes)
    ist/selected/layer_00 .. layer_{N_L-1}     share of the optimizer steps since the last log that trained the layer
    ist/probe_loss                             mean loss of the last importance update's N_c candidates

They go into the log the Trainer hands ``on_log`` (the reporters that run after ISTCallback get
them: all of them when :func:`istune.add_ist` put it first) and into ``trainer.state.log_history``.
A console printer that runs after it gets the short line of :mod:`istune.integrations.console`
instead when no reporter follows. Rules that train all layers or fixed ones report nothing.
"""

from __future__ import annotations

import logging

import torch

from istune.core.tuner import SparseTuner
from istune.integrations.console import console_logs
from istune.integrations.trainer_internals import add_to_logged_entry

logger = logging.getLogger(__name__)


class LogMetrics:
    """Counts the selections between two logs and adds the IST metrics to each training log."""

    def __init__(self):
        self._selection_counts: torch.Tensor | None = None
        self._steps_since_log = 0
        self._last_probe: dict | None = None
        self._warned_about_reporters = False

    def start(self, num_layers: int) -> None:
        """Start counting for a training run over ``num_layers`` layers."""
        self._selection_counts = torch.zeros(num_layers)
        self._steps_since_log = 0

    def count(self, selected: list[int]) -> None:
        """An optimizer step trains the layers ``selected``."""
        self._selection_counts[selected] += 1
        self._steps_since_log += 1

    def probe_done(self, record: dict | None) -> None:
        """The tuner's importance update of this step (None: there was none)."""
        if record is not None:
            self._last_probe = record

    def add_to(self, logs: dict, state, tuner: SparseTuner, short: bool) -> None:
        """Add the metrics to a training log (``short``: only the console's line) and to its ``log_history`` entry."""
        if tuner.rule.trains_all_layers or tuner.rule.trains_given_layers:
            return  # 'all' and 'fixed' have nothing that changes to report
        metrics = {}
        if tuner.rule.runs_importance_probes:
            metrics.update({f"ist/importance/layer_{i:02d}": float(v) for i, v in enumerate(tuner.importance)})
        rates = self._selection_counts / max(self._steps_since_log, 1)
        metrics.update({f"ist/selected/layer_{i:02d}": float(v) for i, v in enumerate(rates)})
        if self._last_probe is not None:
            metrics["ist/probe_loss"] = sum(self._last_probe["losses"]) / len(self._last_probe["losses"])
        self._selection_counts.zero_()
        self._steps_since_log = 0
        logs.update(console_logs(metrics) if short else metrics)
        add_to_logged_entry(state, metrics)

    def warn_reporters_miss_them(self, report_to, log_file: str) -> None:
        """Once: the reporters the Trainer lists before a callback it was given get no IST metric."""
        if not report_to or self._warned_about_reporters:
            return
        self._warned_about_reporters = True
        logger.warning(
            "IST metrics (ist/importance/*, ist/selected/*, ist/probe_loss) will not reach the reporters %s: the "
            "Trainer calls them before the callbacks given in Trainer(callbacks=[...]) and hands callbacks no "
            "Trainer to change that. Add IST with istune.add_ist(trainer, config) after building the Trainer. "
            "The metrics are in trainer.state.log_history and %s either way.", list(report_to), log_file)
