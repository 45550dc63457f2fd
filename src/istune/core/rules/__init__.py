"""The selection rules, registered by name at import (``ISTConfig(strategy=...)``).

=============  ==================================================  ========================================
name           what it trains                                      parameters (declared in its module)
=============  ==================================================  ========================================
'ist'          N_u layers sampled by the learned importance I      IST's (num_probes, probe_interval, ...)
'random'       N_u layers uniformly at random                      switch_interval
'lisa'         'random' under LISA's name (Pan et al. 2024)        switch_interval (LISA's period K)
'badam'        blocks of N_u consecutive layers (Luo et al. 2024)  block_order, switch_interval
'fixed'        the same layers at every step                       layers
'all'          every layer (plain PEFT)                            --
'owlore'       N_u layers in proportion to their outlier ratio     outlier_threshold, calibration_interval
'gradnorm'     N_u layers by an EMA of their gradient norms + ε    exploration, gradnorm_decay
'probe-once'   the N_u layers a first-step probe ranks highest     probe_by
=============  ==================================================  ========================================

``switch_interval`` (K, :data:`istune.core.selection.SWITCH_INTERVAL`) is the tuner's: it keeps a selection
for K optimizer steps for every rule that declares it. IST's own options (N_c, T_c, β, μ) are ISTConfig's fields.
"""

from istune.core.rules.badam import BAdamRule
from istune.core.rules.basic import AllLayersRule, FixedRule, ImportanceRule, RandomRule
from istune.core.rules.gradnorm import GradientNormRule
from istune.core.rules.lisa import LisaRule
from istune.core.rules.owlore import OwLoreRule
from istune.core.rules.probe_once import ProbeOnceRule
from istune.core.selection import register_rule

BUILT_IN_RULES = (ImportanceRule, RandomRule, FixedRule, AllLayersRule, LisaRule, BAdamRule, OwLoreRule,
                  GradientNormRule, ProbeOnceRule)
for _rule in BUILT_IN_RULES:
    register_rule(_rule.name, _rule)
BUILT_IN_NAMES = tuple(rule.name for rule in BUILT_IN_RULES)

__all__ = ["BUILT_IN_NAMES", "BUILT_IN_RULES", "AllLayersRule", "BAdamRule", "FixedRule", "GradientNormRule",
           "ImportanceRule", "LisaRule", "OwLoreRule", "ProbeOnceRule", "RandomRule"]
