"""A selection rule with a parameter of its own, in one file: N_u consecutive layers, the window moving up by
``stride`` layers at each new selection (wrapping around to the bottom).

    istune train --rules_from examples/rules/rotating_window.py --strategy rotating-window --stride 2
    # YAML: rules_from: examples/rules/rotating_window.py, strategy: rotating-window, stride: 2
    # axolotl: a plugin module that imports this file, then ist_strategy: rotating-window, ist_stride: 2
    # Python: import this module, then ISTConfig(strategy="rotating-window", stride=2)

The rule declares ``stride`` once, below; the config checks it, and the command line, YAML and the axolotl
and LLaMA-Factory keys take it, with nothing to add anywhere else (docs/methods.md, "A rule with parameters").
"""

from istune.core.selection import SWITCH_INTERVAL, SelectionRule, register_rule
from istune.rule_catalog import RuleParameter

STRIDE = RuleParameter("stride", 1, low=1, help="How many layers the window moves up at each new selection.")


class RotatingWindow(SelectionRule):
    """N_u consecutive layers from ``start``; each selection starts ``stride`` layers higher."""

    name = "rotating-window"
    uses_probe_batches = False  # it measures nothing
    parameters = (SWITCH_INTERVAL, STRIDE)  # K, which the tuner applies, and its own stride

    def __init__(self, stride: int = STRIDE.default):
        STRIDE.check(stride)
        self.stride = stride
        self.start = 0

    def select(self, view):
        chosen = [(self.start + i) % view.num_layers for i in range(view.count)]
        self.start = (self.start + self.stride) % view.num_layers
        return chosen

    def state_dict(self):  # what a checkpoint keeps, so a resume goes on where it stopped
        return {"start": self.start}

    def load_state_dict(self, state):
        self.start = int(state["start"])


register_rule(RotatingWindow.name, RotatingWindow)
