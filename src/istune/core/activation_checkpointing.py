"""What each decoder layer saves for the backward pass in one IST step, and what it runs again.

IST trains the layers S each step. The gradient of the lowest selected layer flows down
to nothing: no layer below it trains, so a layer below needs no backward pass and autograd
need save nothing for it. Every layer from the lowest selected one upward must pass the
gradient down, so it keeps its activations (or recomputes them).

:class:`LayerCheckpointing` wraps every block's ``forward`` and, per step (:meth:`select`):

- **blocks below the lowest selected layer** run without autograd (``torch.no_grad``): no
  saved activations, no backward, no recompute. Without this, transformers' gradient
  checkpointing (under which peft and the Trainer make the embeddings' output require grad,
  ``enable_input_require_grads``) recomputes and back-propagates through every one of them
  for nothing. When a trainable parameter feeds the blocks from below (LISA-style
  embeddings), they run as usual. Gradients with respect to the input embeddings
  themselves are not computed below the lowest selected layer. When the blocks come from
  several lists (a vision tower's blocks, then the language model's: ``segments``), this is
  asked once a step for each list: a trainable projector between the two feeds the language
  model's blocks and not the tower's.
- **blocks from the lowest selected layer upward**, under transformers' gradient
  checkpointing (``gradient_checkpointing=True`` in the Trainer,
  ``model.gradient_checkpointing_enable()``): checkpointed as transformers does it. Under
  the reentrant variant the lowest selected block's input is made to require grad
  (reentrant checkpointing computes parameter gradients only then), as peft's
  ``enable_input_require_grads`` does at the embeddings.
- **with** ``ISTConfig.recompute_unselected`` **and without transformers' checkpointing**:
  the unselected blocks above the lowest selected one keep only their inputs and run their
  forward again in the backward pass (non-reentrant :func:`torch.utils.checkpoint.checkpoint`,
  RNG state restored so dropout draws the same masks); selected blocks keep their activations.
- **with** ``ISTConfig.stored_layers = M``, with or without transformers' checkpointing: of
  the blocks from the lowest selected one upward, M keep their activations and the others are
  recomputed (by transformers' checkpointing where it is on, else as above). The top block is
  stored first: the backward pass of the blocks starts there, so its activations are freed
  before any recompute, and a recompute of it would rebuild the same bytes at that moment.
  Storing it adds to the peak only where the peak comes earlier (the loss and the LM head's
  backward, with a large vocabulary). Then unselected blocks, from the top: a frozen block
  keeps less than a trained one (no adapter inputs for weight gradients) and costs the same
  forward to recompute, so storing it buys the same time for less memory. A stored block's
  ``gradient_checkpointing`` flag is off for the step (restored at the next
  :meth:`~LayerCheckpointing.select` and at :meth:`~LayerCheckpointing.remove`), which works
  whichever transformers version wraps the call.

Results are those of a run without any checkpointing (same losses, same gradients). A
checkpointed block does not write to a KV cache (the replay would write it twice), as under
transformers' own checkpointing; training has no use for the cache.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerCheckpointing:
    """Wraps each decoder block's ``forward`` with the step's checkpointing policy (module docstring).

    Args:
        blocks: every decoder block, in layer order (``blocks[i]`` is block index i), adapters or not.
        recompute_unselected: checkpoint the unselected blocks above the lowest selected one
            when transformers' own checkpointing is off.
        stored_layers: how many blocks from the lowest selected one upward keep their activations
            (the top block, then unselected ones from the top); the others are recomputed. None: leave it to
            transformers' checkpointing and ``recompute_unselected``.
        segments: the layer list each block belongs to (``segments[i]`` for block i, non-decreasing), when
            the blocks come from several lists (``towers="select"``); default: one list.

    Call :meth:`select` with the block indices trained this step before the forward pass,
    and :meth:`remove` to restore the original ``forward`` methods.

    Attributes:
        recomputed_calls: forwards run under istune's own checkpoint (once per forward, not per replay).
        skipped_calls: forwards of blocks below the lowest selected one that got an input requiring grad
            and ran without autograd (the first such block cuts the graph: the blocks after it get none).
        stored: the block indices that keep their activations this step under ``stored_layers``.
    """

    def __init__(self, blocks: list[nn.Module], recompute_unselected: bool = False,
                 stored_layers: int | None = None, segments: list[int] | None = None):
        self.blocks = list(blocks)
        self.segments = list(segments) if segments is not None else [0] * len(self.blocks)
        if len(self.segments) != len(self.blocks):
            raise ValueError(f"LayerCheckpointing: {len(self.segments)} segments for {len(self.blocks)} blocks; "
                             "give one per block.")
        self.recompute_unselected = recompute_unselected
        self.stored_layers = stored_layers
        self._lowest = 0  # blocks below this index need no backward this step
        self._recomputed: frozenset[int] = frozenset()  # blocks istune checkpoints when transformers does not
        self.stored: frozenset[int] = frozenset()
        self._unflagged: list[int] = []  # blocks whose transformers checkpointing flag is off for this step
        self._upstream_trainable: dict[int, bool] = {}  # per segment: does a trainable parameter feed it?
        self.recomputed_calls = 0
        self.skipped_calls = 0
        # A forward already set on the instance (accelerate's device-map hooks do that) is wrapped and put back.
        self._instance_forwards = [vars(block).get("forward") for block in self.blocks]
        for index, block in enumerate(self.blocks):
            block.forward = self._wrap(index, block, block.forward)

    def select(self, selected_blocks: list[int]) -> None:
        """Set this step's policy from the block indices whose parameters train."""
        selected = frozenset(selected_blocks)
        self._lowest = min(selected_blocks) if selected_blocks else len(self.blocks)
        self._upstream_trainable = {}  # does a trainable parameter feed a list's blocks from below? (first forward)
        running = range(self._lowest, len(self.blocks))  # the blocks that run the backward pass
        if self.stored_layers is None:
            self.stored = frozenset()
            self._recomputed = frozenset(i for i in running if i not in selected) if self.recompute_unselected \
                else frozenset()
        else:
            top = len(self.blocks) - 1  # its activations are freed first (module docstring)
            top_down = sorted(running, key=lambda i: (i != top, i in selected, -i))  # then unselected, from the top
            self.stored = frozenset(top_down[:self.stored_layers])
            self._recomputed = frozenset(running) - self.stored
        self._restore_flags()
        for index in sorted(self.stored):  # kept out of transformers' checkpointing for this step
            if getattr(self.blocks[index], "gradient_checkpointing", False):
                self.blocks[index].gradient_checkpointing = False
                self._unflagged.append(index)

    def reentrant_in_use(self) -> bool:
        """True when transformers' checkpointing of some block is on, in torch's reentrant variant.

        Unlike :func:`uses_reentrant_checkpointing`, a stored block counts with the flag it has outside this step.
        """
        return any((getattr(block, "gradient_checkpointing", False) or index in self._unflagged)
                   and checkpoints_reentrant(block) for index, block in enumerate(self.blocks))

    def remove(self) -> None:
        """Give every block back the ``forward`` and the checkpointing flag it had before."""
        self._restore_flags()
        for block, forward in zip(self.blocks, self._instance_forwards):
            if forward is None:
                vars(block).pop("forward", None)
            else:
                block.forward = forward

    def _restore_flags(self) -> None:
        for index in self._unflagged:
            self.blocks[index].gradient_checkpointing = True
        self._unflagged = []

    def _wrap(self, index: int, block: nn.Module, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def step_policy(*args: Any, **kwargs: Any):
            if not (torch.is_grad_enabled() and block.training):
                return forward(*args, **kwargs)  # probes and evaluation
            gc_by_transformers = _checkpointed_by_transformers(block)
            if index == self._lowest and gc_by_transformers and checkpoints_reentrant(block):
                args = _input_requiring_grad(args)
            if index < self._lowest:
                output = self._below_lowest(self.segments[index], forward, args, kwargs)
                # transformers before 5.2x (axolotl's 5.16) checkpoints in __call__, around this wrapper: a reentrant
                # checkpoint's replay needs an output that requires grad, and the lowest block's own wrapper runs
                # inside its checkpoint, too late to make its input require grad. Both are settled here.
                feeds_lowest = (index == self._lowest - 1 and self._lowest < len(self.blocks)
                                and self.segments[index] == self.segments[self._lowest])
                if _reentrant_checkpoint(block) or (feeds_lowest and _reentrant_checkpoint(self.blocks[self._lowest])):
                    output = _output_requiring_grad(output)
                return output
            if not gc_by_transformers and index in self._recomputed:
                self.recomputed_calls += 1
                if not getattr(block, "_can_checkpoint_with_cache", False):  # transformers' flag: reads the cache only
                    args, kwargs = _without_cache(args, kwargs)
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)  # under transformers' checkpointing: checkpointed by it

        return step_policy

    def _below_lowest(self, segment: int, forward: Callable, args: tuple, kwargs: dict):
        """A block below the lowest selected one: without autograd where nothing trainable feeds it."""
        if not _needs_backward(args, kwargs):
            return forward(*args, **kwargs)  # nothing below trains: autograd saves nothing anyway
        if segment not in self._upstream_trainable:  # once per step and list: the model does not change within one
            self._upstream_trainable[segment] = _reaches_trainable_parameter(args, kwargs)
        if not self._upstream_trainable[segment]:
            self.skipped_calls += 1
            with torch.no_grad():
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """True if a module of ``model`` has transformers' checkpointing on, in torch's reentrant variant.

    Checked before a Trainer's first step: DDP refuses it
    (:func:`istune.core.checks.refuse_reentrant_checkpointing_under_ddp`). A module's flag is its
    ``gradient_checkpointing`` attribute; its variant, :func:`checkpoints_reentrant`.
    """
    return any(getattr(module, "gradient_checkpointing", False) is True and checkpoints_reentrant(module)
               for module in model.modules())


def checkpoints_reentrant(module: nn.Module) -> bool:
    """True when the function ``module`` checkpoints with is torch's reentrant variant (flag on or off).

    That function (``_gradient_checkpointing_func``) is transformers' ``functools.partial(checkpoint, **kwargs)``
    (reentrant unless ``use_reentrant=False``: torch's default), ``checkpoint`` itself, or a wrapper around one of
    them that keeps it as ``__wrapped__`` (``functools.wraps``): LLaMA-Factory's checkpoints only the layers that
    have trainable parameters and wraps ``use_reentrant=True`` by default.
    """
    function = getattr(module, "_gradient_checkpointing_func", None)
    if function is not None:
        function = inspect.unwrap(function)
    if isinstance(function, functools.partial):
        return bool(function.keywords.get("use_reentrant", True))
    return function is checkpoint


def _checkpointed_by_transformers(block: nn.Module) -> bool:
    """True when transformers' own gradient checkpointing wraps this block's call."""
    return bool(getattr(block, "gradient_checkpointing", False)) and block.training


def _reentrant_checkpoint(block: nn.Module) -> bool:
    """True when transformers checkpoints this block's call with torch's reentrant variant."""
    return _checkpointed_by_transformers(block) and checkpoints_reentrant(block)


def _input_requiring_grad(args: tuple) -> tuple:
    """``args`` with the hidden states (first positional argument) made a leaf that requires grad.

    Reentrant checkpointing gives parameters gradients only when an input requires grad; below the
    lowest selected block nothing ran autograd, so its input does not. The price is one B x T x d gradient.
    """
    if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(True), *args[1:])
    return args


def _output_requiring_grad(output: Any) -> Any:
    """A block's output with its hidden states (the tensor, or a tuple's first item) made a leaf that requires grad."""
    if isinstance(output, tuple) and output:
        return (*_input_requiring_grad(output[:1]), *output[1:])
    return _input_requiring_grad((output,))[0]


def _is_kv_cache(value: Any) -> bool:
    """A transformers ``Cache`` (or a legacy look-alike): something a layer appends its keys and values to."""
    return hasattr(value, "update") and hasattr(value, "get_seq_length")


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with every KV cache replaced by None and ``use_cache`` off."""
    args = tuple(None if _is_kv_cache(value) else value for value in args)
    kwargs = {name: None if _is_kv_cache(value) else value for name, value in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _tensors(args: tuple, kwargs: dict):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _needs_backward(args: tuple, kwargs: dict) -> bool:
    """True when some input tensor requires grad: a layer below it trains (or the embeddings' output was made to)."""
    return any(tensor.requires_grad for tensor in _tensors(args, kwargs))


def _reaches_trainable_parameter(args: tuple, kwargs: dict) -> bool:
    """True when the autograd graph of an input leads to a trainable parameter (e.g. trained embeddings).

    A leaf that is not a parameter (the embeddings' output that ``enable_input_require_grads`` made
    require grad, or ``inputs_embeds`` given that way) does not count.
    """
    seen = set()
    pending = []
    for tensor in _tensors(args, kwargs):
        if tensor.requires_grad:
            if tensor.grad_fn is None:
                if isinstance(tensor, nn.Parameter):
                    return True
            else:
                pending.append(tensor.grad_fn)
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            if isinstance(variable, nn.Parameter):
                return True
            continue
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False
