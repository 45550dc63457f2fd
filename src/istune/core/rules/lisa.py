"""LISA: N_u layers uniformly at random, re-drawn every K steps (Pan et al. 2024).

Pan, Liu, Diao, Pi, Zhang, Zhang, "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning" (2024), Algorithm 1: every K steps (the sampling period) freeze all
middle layers except γ of them drawn uniformly at random; train the unfrozen ones for K steps.

In istune that is the 'random' rule with ``switch_interval`` = K and ``update_layers`` = γ (N_u): the
tuner holds each draw for K optimizer steps. Both names stay: 'random' is the baseline of the IST
paper (a fresh draw every step by default), 'lisa' names the peer. One difference: LISA always trains
the embeddings and the LM head as well (full-parameter fine-tuning); istune trains the adapters inside
the decoder layers and leaves the embeddings and head as the model has them (frozen under PEFT).
"""

from __future__ import annotations

from istune.core.rules.basic import RandomRule


class LisaRule(RandomRule):
    """LISA's layer choice: the 'random' rule under its own name (K is ``switch_interval``).

    Example:
        >>> ISTConfig(strategy="lisa", update_layers=2, switch_interval=50)
    """

    name = "lisa"
