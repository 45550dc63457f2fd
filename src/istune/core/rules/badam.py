"""BAdam's block order: consecutive blocks of N_u layers, one block at a time (Luo et al. 2024).

Luo, Yu, Li, "BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language Models"
(NeurIPS 2024): the parameters are partitioned into D blocks (in its code, one transformer layer per
block); each block is optimised by Adam for K steps (``switch_block_every``) while the others stay
frozen, then the next block takes over. One pass over all D blocks is a block-epoch. The order
(``switch_mode``): 'ascending' (the input layers first), 'descending' (the output layers first),
'random' (a fresh random order of the blocks at each pass).

In istune a block is N_u consecutive layers (``update_layers``; N_u = 1 is BAdam's own partition of
the decoder layers), K is ``switch_interval``, and the order is ``block_order``. The blocks are
``[b·N_u, b·N_u + N_u)`` for b = 0 .. D-1 with D = ceil(N_L / N_u). When N_u does not divide N_L the
last block would be shorter than N_u; every selection holds exactly N_u layers, so the last block
wraps around to the bottom: with N_L = 10 and N_u = 4 the blocks are [0-3], [4-7], [8, 9, 0, 1].
Each pass trains every layer at least once and the first ``D·N_u − N_L`` layers twice.

Differences from BAdam: istune trains adapters (BAdam trains whole layers; ``--method full`` in
istune does so too), and BAdam's separate blocks for the embeddings and the LM head are not here. The
optimizer state of a block that is switched off is kept by default; BAdam frees it
(``unselected_optimizer_state='drop'`` does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from istune.core.rules.sampling import check_state
from istune.core.selection import SWITCH_INTERVAL, SelectionRule, StepView
from istune.rule_catalog import RuleParameter

BLOCK_ORDER = RuleParameter(
    "block_order", "ascending", choices=("ascending", "descending", "random"), source="Luo et al. 2024",
    help="BAdam's switch_mode (Luo et al. 2024), the order in which the blocks of N_u consecutive layers train: "
    "'ascending' (the bottom block first; BAdam's README example), 'descending' (the top block first), 'random' "
    "(a fresh permutation of the blocks at every pass).")
BLOCK_ORDERS = BLOCK_ORDER.choices


class BAdamRule(SelectionRule):
    """Blocks of N_u consecutive layers, one per switch, in ascending, descending or random order.

    Args:
        block_order: 'ascending' (bottom block first), 'descending' (top block first) or 'random'
            (a fresh permutation of the blocks at every pass, drawn from the tuner's generator).

    Example:
        >>> ISTConfig(strategy="badam", update_layers=1, switch_interval=50, block_order="descending")

    Raises:
        ValueError: ``block_order`` is not one of :data:`BLOCK_ORDERS`.
    """

    name = "badam"
    uses_probe_batches = False
    parameters = (SWITCH_INTERVAL, BLOCK_ORDER)

    def __init__(self, block_order: str = BLOCK_ORDER.default):
        BLOCK_ORDER.check(block_order)
        self.block_order = block_order
        self.order: list[int] = []  # the blocks of the current pass, in the order they train
        self.next = 0  # index in ``order`` of the block the next switch trains

    @staticmethod
    def blocks(num_layers: int, count: int) -> list[list[int]]:
        """The D = ceil(N_L / N_u) blocks of ``count`` consecutive positions, the last wrapping to the bottom."""
        num_blocks = -(-num_layers // count)
        return [[(block * count + i) % num_layers for i in range(count)] for block in range(num_blocks)]

    def select(self, view: StepView) -> Sequence[int]:
        blocks = self.blocks(view.num_layers, view.count)
        if self.next >= len(self.order) or len(self.order) != len(blocks):  # a new pass
            self.order = self._pass_order(len(blocks), view.generator)
            self.next = 0
        block = blocks[self.order[self.next]]
        self.next += 1
        return sorted(block)

    def _pass_order(self, num_blocks: int, generator: torch.Generator) -> list[int]:
        if self.block_order == "ascending":
            return list(range(num_blocks))
        if self.block_order == "descending":
            return list(range(num_blocks - 1, -1, -1))
        return torch.randperm(num_blocks, generator=generator).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"block_order": self.block_order, "order": list(self.order), "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ("order", "next"))
        self.order = [int(block) for block in state["order"]]
        self.next = int(state["next"])
