"""The selection rules, registered by name at import (``ISTConfig(strategy=...)``).

=============  ==================================================  ========================================
name           what it trains                                      parameters (ISTConfig fields)
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

``switch_interval`` (K) is the tuner's: it keeps a selection for K optimizer steps for every rule.
"""

from istune.core.rules.badam import BAdamRule
from istune.core.rules.basic import AllLayersRule, FixedRule, ImportanceRule, RandomRule
from istune.core.rules.gradnorm import GradientNormRule
from istune.core.rules.lisa import LisaRule
from istune.core.rules.owlore import OwLoreRule
from istune.core.rules.probe_once import ProbeOnceRule
from istune.core.selection import register_rule

for _rule in (ImportanceRule, RandomRule, FixedRule, AllLayersRule, LisaRule, BAdamRule, OwLoreRule,
              GradientNormRule, ProbeOnceRule):
    register_rule(_rule.name, _rule.from_config)

__all__ = ["AllLayersRule", "BAdamRule", "FixedRule", "GradientNormRule", "ImportanceRule", "LisaRule",
           "OwLoreRule", "ProbeOnceRule", "RandomRule"]
