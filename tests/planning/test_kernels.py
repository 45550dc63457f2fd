"""istune.planning.kernels: bytes of what the kernels store."""

import pytest
import torch

from istune.planning.kernels import nf4_bytes


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_what_bitsandbytes_stores(double_quant):
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(300, 200, dtype=torch.bfloat16)  # 60000 parameters: 938 blocks, the last one partial
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                             compress_statistics=double_quant)
    stored = [packed, state.absmax, state.code]
    if double_quant:
        stored += [state.state2.absmax, state.state2.code, state.offset]
    assert nf4_bytes(weight.numel(), double_quant) == sum(t.nbytes for t in stored)
