"""What a GPU run does that the meta device would do differently: fused SDPA attention and 4-bit linear layers.

The planner (:mod:`istune.planning.planner`) runs a training step on PyTorch's meta device and
counts the tensors it keeps. Two kernels need a stand-in there:

- **SDPA attention.** On the meta device ``F.scaled_dot_product_attention`` falls back to
  its math decomposition, which keeps the ``(B, H, L, L)`` attention matrix, as eager
  attention does. On a GPU (and on a CPU) SDPA runs a fused kernel that keeps only its
  output and one log-sum-exp per query row. :func:`fused_sdpa_on_meta` makes meta tensors
  go through ``aten._scaled_dot_product_flash_attention``, whose meta kernel and autograd
  formula are the CUDA kernel's: the same saved tensors and the same backward outputs.
  The planner's batches have no padding and no mask, so transformers passes ``is_causal``
  as it does on a real device; its check for packed sequences (which reads values) is
  answered "none" for meta tensors.

  **Except fp32 with grouped KV heads on a GPU.** With no mask, transformers (5.x,
  ``use_gqa_in_sdpa``) passes ``enable_gqa=True`` for a model with fewer KV heads than query
  heads (SmolLM2, TinyLLaMA, LLaMA-3). On CUDA, flash attention takes only fp16/bf16 and the
  memory-efficient and cuDNN kernels take no GQA broadcast, so an fp32 call falls back to the
  math kernel, which keeps the ``(B, H, L, L)`` attention probabilities (and K/V repeated to
  H heads) as eager attention does (pytorch/pytorch#181528 adds a warning for exactly this).
  With ``kernels="cuda"`` (the planner's default) the stand-in keeps what that math kernel
  keeps; ``kernels="cpu"`` models torch's CPU flash kernel, which takes fp32 and GQA.
- **bitsandbytes 4-bit (QLoRA).** :class:`Meta4bitLinear` holds the storage bitsandbytes
  holds for an nf4 weight and runs a matmul that saves what
  ``bitsandbytes.autograd._functions.MatMul4Bit`` saves (nothing but the packed weight),
  with the dequantized ``(out, in)`` weight as a backward temporary, as its backward makes.

nf4 storage of a weight of ``n`` parameters (QLoRA, Dettmers et al. 2023, section 3; bitsandbytes
``quantize_4bit``, block 64): ``ceil(n / 2)`` packed bytes and the 64-byte nf4 code, plus one fp32 absmax per
block (0.5 bit per parameter) or, with double quantization, 8-bit absmaxes, one fp32 absmax per 256 of them,
their mean and the 1 KiB code of the 8-bit map (0.127 bit per parameter): :func:`nf4_bytes`.

Also here, because it is the same question: ``--check`` of ``istune bench memory`` compares with the CPU's
kernels (``kernels="cpu"``); torch's CPU flash kernel has no dropout, so with attention dropout the CPU
runs SDPA's math fallback (probabilities and dropout mask kept), while a GPU's fused kernels apply dropout
inside the kernel: SDPA rows of such shapes are checked without attention dropout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["KERNEL_DEVICES", "Meta4bitLinear", "fused_sdpa_on_meta", "nf4_bytes", "quantize_linear_layers",
           "sdpa_falls_back_to_math"]

NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit weights
NESTED_BLOCK = 256  # double quantization: absmaxes per second-level block


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps for one nf4-quantized weight of ``numel`` parameters (see the module docstring)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    nf4_code = 4 * 16
    if not double_quant:
        return packed + nf4_code + 4 * blocks
    return packed + nf4_code + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * 256


KERNEL_DEVICES = ("cuda", "cpu")  # whose SDPA kernel choice the meta device stands in for


def sdpa_falls_back_to_math(query: torch.Tensor, key: torch.Tensor, enable_gqa: bool, kernels: str) -> bool:
    """True when SDPA on ``kernels``' device runs its math kernel for this call (module docstring)."""
    grouped = enable_gqa and query.shape[-3] != key.shape[-3]
    return kernels == "cuda" and grouped and query.dtype == torch.float32


@contextlib.contextmanager
def fused_sdpa_on_meta(kernels: str = "cuda") -> Iterator[None]:
    """Inside the block, SDPA on meta tensors keeps what ``kernels``' device keeps: the fused kernel's output and
    log-sum-exp, not the attention matrix (except where that device falls back to the math kernel)."""
    if kernels not in KERNEL_DEVICES:
        raise ValueError(f"kernels={kernels!r}: use one of {', '.join(KERNEL_DEVICES)}.")
    original = torch.nn.functional.scaled_dot_product_attention

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if query.device.type != "meta" or sdpa_falls_back_to_math(query, key, enable_gqa, kernels):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)  # on meta: the math decomposition
        causal = is_causal or attn_mask is not None  # no padding in planned batches: the mask is the causal one
        output = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, causal and query.shape[-2] > 1, False, scale=scale)
        return output[0]

    from transformers import masking_utils

    find_packed = masking_utils.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        return None if position_ids.device.type == "meta" else find_packed(position_ids)

    torch.nn.functional.scaled_dot_product_attention = scaled_dot_product_attention
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        masking_utils.find_packed_sequence_indices = find_packed


class _MatMul4bit(torch.autograd.Function):
    """``x @ W.T`` with ``W`` nf4: saves nothing for backward; the backward dequantizes ``W`` into a temporary."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        ctx.shape = (out_features, x.shape[-1])
        return torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = torch.empty(ctx.shape, dtype=grad_output.dtype, device=grad_output.device)  # dequantized
        return grad_output @ weight, None, None


class Meta4bitLinear(nn.Linear):
    """A frozen linear layer stored as bitsandbytes stores an nf4 weight (for the planner; meta device only).

    Its ``forward`` does what ``bitsandbytes.nn.Linear4bit.forward`` does around the matmul:
    the input is cast to ``compute_dtype`` and the output back to the input's dtype.
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        numel = linear.weight.numel()
        device = linear.weight.device
        # The packed codes are the weight (peft reads base_layer.weight); the quantization state is in buffers.
        self.weight = nn.Parameter(torch.empty(math.ceil(numel / 2), 1, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        state = nf4_bytes(numel, double_quant) - math.ceil(numel / 2)
        self.register_buffer("quant_state", torch.empty(state, dtype=torch.uint8, device=device))
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        out = _MatMul4bit.apply(x.to(self.compute_dtype), self.weight, self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(input_dtype)


def quantize_linear_layers(model: nn.Module, blocks: list[nn.Module], compute_dtype: torch.dtype,
                           double_quant: bool = True) -> int:
    """Replace every ``nn.Linear`` inside ``blocks`` (the decoder layers) by a :class:`Meta4bitLinear`.

    transformers' bitsandbytes integration quantizes every linear layer but the LM head
    (its ``modules_to_not_convert``), which lies outside the decoder layers. Returns the count.
    """
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, Meta4bitLinear(module, compute_dtype, double_quant))
                count += 1
    if count == 0:
        raise ValueError(f"--load_in_4bit: {type(model).__name__} has no nn.Linear in its decoder layers to quantize")
    return count
