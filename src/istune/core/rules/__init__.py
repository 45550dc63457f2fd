"""The data-driven selection rules, registered by name at import (``ISTConfig(strategy=...)``).

=============  ==================================================  ================================
name           what it trains                                      parameters (ISTConfig fields)
=============  ==================================================  ================================
'owlore'       N_u layers in proportion to their outlier ratio     outlier_threshold, calibration_interval
'gradnorm'     N_u layers by an EMA of their gradient norms + ε    exploration, gradnorm_decay
'probe-once'   the N_u layers a first-step probe ranks highest     probe_by
=============  ==================================================  ================================
"""

from istune.core.rules.gradnorm import GradientNormRule
from istune.core.rules.owlore import OwLoreRule
from istune.core.rules.probe_once import ProbeOnceRule
from istune.core.selection import register_rule

for _rule in (OwLoreRule, GradientNormRule, ProbeOnceRule):
    register_rule(_rule.name, _rule.from_config)

__all__ = ["GradientNormRule", "OwLoreRule", "ProbeOnceRule"]
