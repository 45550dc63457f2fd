"""Peak memory of training steps, split by what the memory holds.

``MemoryTracker`` counts the bytes of tensor storages alive inside its block and keeps the largest total
(the peak) with what made it up. A ``TorchDispatchMode`` sees the output of every aten operator, the
backward's too; each output's untyped storage is recorded once (whatever its views) with a weak reference
whose callback takes its bytes off when it is freed. Storage bytes, not allocator blocks: the figures do not
depend on the device or allocator rounding. Of what exists on entry, only the model's parameters and
buffers, their ``.grad`` and the optimizer's state are counted. On CUDA the allocator's own peak is
reported beside it.

Categories (``CATEGORIES``): ``weights`` (parameters and buffers), ``gradients`` (some parameter's
``.grad``), ``optimizer`` (its state; inside ``optimizer.step()`` also the step's temporaries),
``activations`` (saved for backward, seen through ``saved_tensors_hooks``) and ``other`` (logits, loss,
activation gradients, the backward's temporaries). A storage keeps its first category, except that becoming
a ``.grad`` or optimizer state moves it there and being saved for backward moves it from ``other`` to
``activations``. ``scopes`` (optional) attribute activations to modules (the innermost scope whose forward
saved them).

Limits: kernels' private workspaces and allocations that bypass the dispatcher are not seen; tensors saved
inside another ``saved_tensors_hooks`` context (activation checkpointing) count as ``other``; non-strided
layouts are ignored.

Example::

    with MemoryTracker(model, optimizer) as tracker:
        for step in range(4):
            with tracker.region(f"step {step}"):
                train_step(model, optimizer, batch)
    tracker.report()["peak_bytes"]
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = ["CATEGORIES", "PHASES", "MemoryTracker"]

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")
# When a peak happened: inside loss.backward(), inside optimizer.step(), or anywhere else
# (the forward pass and whatever else the block runs).
PHASES = ("forward", "backward", "optimizer step")

# -1 outside the autograd engine, the running graph task's id inside it (its hooks and operators).
_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class _Record:
    """One live storage: its size, its category and the weak reference that watches it."""

    __slots__ = ("nbytes", "category", "scope", "ref")

    def __init__(self, nbytes: int, category: str) -> None:
        self.nbytes = nbytes
        self.category = category
        self.scope: str | None = None  # activations only: the scope whose forward saved it
        self.ref: weakref.ref | None = None


class _Peak:
    """The largest total seen (in one region or overall), its split by category and by scope."""

    def __init__(self, name: str, categories: dict[str, int], scopes: dict[str, int], phase: str = "forward") -> None:
        self.name = name
        self.bytes = sum(categories.values())
        self.breakdown = dict(categories)
        self.scopes = dict(scopes)
        self.phase = phase

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peak_bytes": self.bytes,
            "peak_breakdown": dict(self.breakdown),
            "peak_activations_by_scope": dict(self.scopes),
            "peak_phase": self.phase,
        }


def _strided_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The plain strided tensors in an operator's output (tuples, lists and wrapper subclasses opened)."""
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from _strided_tensors(getattr(obj, name))
        elif obj.layout == torch.strided:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _strided_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _strided_tensors(item)


class MemoryTracker(TorchDispatchMode):
    """Track the peak of live tensor bytes inside a ``with`` block (used once), split into categories.

    Args:
        model: the model trained in the block: its parameters and buffers are the ``weights``.
        optimizer: the optimizer(s) whose state is the ``optimizer`` category. Default None.
        device: count only storages on this device. Default: the device of the model's first parameter.
        scopes: named modules (decoder layers, say) to attribute saved activations to. Default None.

    Inside the block, ``region(name)`` marks a stretch (a training step, say) whose own peak is reported too.
    """

    def __init__(self, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
                 device: torch.device | str | None = None,
                 scopes: Mapping[str, torch.nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        if optimizer is None:
            self.optimizers: list[torch.optim.Optimizer] = []
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizers = [optimizer]
        else:
            self.optimizers = list(optimizer)
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.scopes = dict(scopes or {})

        self._records: dict[int, _Record] = {}  # id(untyped storage) -> record
        self._current = dict.fromkeys(CATEGORIES, 0)
        self._scope_current = dict.fromkeys(self.scopes, 0)
        self._category_max = dict.fromkeys(CATEGORIES, 0)
        self._peak = _Peak("all", self._current, self._scope_current)
        self._region: _Peak | None = None
        self._regions: list[_Peak] = []
        self._scope_stack: list[str] = []
        self._in_optimizer_step = False
        self._params: list[torch.nn.Parameter] = []
        self._handles: list[Any] = []
        self._saved_hooks: contextlib.AbstractContextManager | None = None
        self._state = "new"  # new -> active -> done
        self._final: dict[str, int] | None = None
        self._allocator_peak: int | None = None

    # ------------------------------------------------------------------ bookkeeping

    def _lookup(self, storage: torch.UntypedStorage) -> _Record | None:
        record = self._records.get(id(storage))
        return record if record is not None and record.ref() is storage else None

    def _add(self, storage: torch.UntypedStorage, category: str) -> _Record | None:
        """Record ``storage`` under ``category`` if new; return its record (None if not counted)."""
        if storage.device != self.device:
            return None
        record = self._lookup(storage)
        nbytes = storage.nbytes()
        if record is not None:
            if nbytes != record.nbytes:  # resized in place (resize_, out= operators)
                self._current[record.category] += nbytes - record.nbytes
                if record.scope is not None:
                    self._scope_current[record.scope] += nbytes - record.nbytes
                record.nbytes = nbytes
            return record
        key = id(storage)
        stale = self._records.get(key)
        if stale is not None:  # its storage died without its callback having run yet
            self._forget(key, stale)
        record = _Record(nbytes, category)
        record.ref = weakref.ref(storage, self._finalizer(key, record))
        self._records[key] = record
        self._current[category] += nbytes
        return record

    def _forget(self, key: int, record: _Record) -> None:
        if self._records.get(key) is record:
            del self._records[key]
            self._current[record.category] -= record.nbytes
            if record.scope is not None:
                self._scope_current[record.scope] -= record.nbytes

    def _finalizer(self, key: int, record: _Record):
        def storage_freed(_ref: weakref.ref) -> None:
            self._forget(key, record)

        return storage_freed

    def _recategorize(self, record: _Record, category: str, scope: str | None = None) -> None:
        if record.category == category:
            return
        self._current[record.category] -= record.nbytes
        self._current[category] += record.nbytes
        record.category = category
        if record.scope is not None:
            self._scope_current[record.scope] -= record.nbytes
        record.scope = scope
        if scope is not None:
            self._scope_current[scope] += record.nbytes

    def _move(self, tensor: torch.Tensor, category: str) -> None:
        """Give the storage(s) of ``tensor`` the category ``category`` (recording them if new)."""
        for t in _strided_tensors(tensor):
            record = self._add(t.untyped_storage(), category)
            if record is not None:
                self._recategorize(record, category)

    def _sync_gradients(self) -> None:
        for p in self._params:
            grad = p.grad
            if grad is not None:
                self._move(grad, "gradients")

    def _optimizer_state_tensors(self) -> Iterator[torch.Tensor]:
        for opt in self.optimizers:
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        yield value

    def _sync_optimizer_state(self) -> None:
        for value in self._optimizer_state_tensors():
            self._move(value, "optimizer")

    def _sync(self) -> None:
        self._sync_gradients()
        self._sync_optimizer_state()
        self._update_peaks()

    def _update_peaks(self) -> None:
        current = self._current
        total = sum(current.values())
        for name, value in current.items():
            if value > self._category_max[name]:
                self._category_max[name] = value
        for peak in (self._peak, self._region):
            if peak is not None and total > peak.bytes:
                peak.bytes = total
                peak.breakdown = dict(current)
                peak.scopes = dict(self._scope_current)
                peak.phase = self._phase()

    def _phase(self) -> str:
        if self._in_optimizer_step:
            return "optimizer step"
        if _current_graph_task_id() != -1:
            return "backward"
        return "forward"

    # ------------------------------------------------------------------ hooks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sync_gradients()  # catches grads the autograd engine assigned since the last operator
        category = "optimizer" if self._in_optimizer_step else "other"
        for t in _strided_tensors(out):
            self._add(t.untyped_storage(), category)
        self._update_peaks()
        return out

    def _pack_saved(self, tensor: torch.Tensor) -> torch.Tensor:
        scope = self._scope_stack[-1] if self._scope_stack else None
        for t in _strided_tensors(tensor):
            record = self._lookup(t.untyped_storage())
            if record is not None and record.category == "other":
                self._recategorize(record, "activations", scope)
        return tensor

    @staticmethod
    def _unpack_saved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _optimizer_pre_step(self, optimizer, args, kwargs) -> None:
        self._sync_gradients()
        self._update_peaks()
        self._in_optimizer_step = True

    def _optimizer_post_step(self, optimizer, args, kwargs) -> None:
        self._in_optimizer_step = False
        state = {id(t.untyped_storage()) for v in self._optimizer_state_tensors() for t in _strided_tensors(v)}
        for key, record in list(self._records.items()):
            if record.category == "optimizer" and key not in state:  # a step temporary that outlived the step
                self._recategorize(record, "other")
        self._sync()

    def _scope_hooks(self, name: str) -> tuple[Any, Any]:
        def enter(module, args) -> None:
            self._scope_stack.append(name)

        def leave(module, args, output) -> None:
            if self._scope_stack and self._scope_stack[-1] == name:
                self._scope_stack.pop()

        return enter, leave

    # ------------------------------------------------------------------ context

    def __enter__(self) -> MemoryTracker:
        if self._state != "new":
            raise RuntimeError("a MemoryTracker is used once: make a new one for a new measurement")
        self._state = "active"
        gc.collect()  # garbage from before the block must not be freed (and counted off) inside it
        self._params = list(self.model.parameters())
        for tensor in [*self._params, *self.model.buffers()]:
            self._move(tensor, "weights")
        self._sync_gradients()
        self._sync_optimizer_state()
        for opt in self.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._optimizer_pre_step))
            self._handles.append(opt.register_step_post_hook(self._optimizer_post_step))
        for name, module in self.scopes.items():
            enter, leave = self._scope_hooks(name)
            self._handles.append(module.register_forward_pre_hook(enter))
            self._handles.append(module.register_forward_hook(leave, always_call=True))
        self._peak = _Peak("all", self._current, self._scope_current)
        self._category_max = dict(self._current)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_saved, self._unpack_saved)
        self._saved_hooks.__enter__()
        super().__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            self._saved_hooks.__exit__(exc_type, exc, tb)
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._scope_stack.clear()
            self._sync()
            self._final = dict(self._current)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self._allocator_peak = torch.cuda.max_memory_allocated(self.device)
            self._records.clear()  # drops the weak references: nothing is counted after the block
            self._state = "done"

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Report the peak inside this stretch separately, under ``name`` (everything alive counts; no nesting)."""
        if self._state != "active":
            raise RuntimeError("region() is used inside the tracker's `with` block")
        if self._region is not None:
            raise RuntimeError(f"region {name!r} opened inside region {self._region.name!r}: regions do not nest")
        self._sync()
        self._region = _Peak(name, self._current, self._scope_current, self._phase())
        try:
            yield
        finally:
            self._sync()
            self._regions.append(self._region)
            self._region = None

    # ------------------------------------------------------------------ results

    def current(self) -> dict[str, int]:
        """Bytes alive now per category (at the block's end once it has ended)."""
        if self._final is not None:
            return dict(self._final)
        if self._state == "active":
            self._sync()
        return dict(self._current)

    def report(self) -> dict[str, Any]:
        """The measurement, in bytes.

        Returns:
            dict: ``peak_bytes``, and at that moment ``peak_breakdown`` (per category), ``peak_phase`` (one of
            ``PHASES``) and ``peak_activations_by_scope``; ``category_max`` (each category's own largest),
            ``current`` (now, or at the block's end), ``regions`` (each region's peak, in order), ``device`` and
            ``allocator_peak_bytes`` (the CUDA allocator's peak over the block; None off CUDA).
        """
        current = self.current()
        return {
            "device": str(self.device),
            "peak_bytes": self._peak.bytes,
            "peak_breakdown": dict(self._peak.breakdown),
            "peak_phase": self._peak.phase,
            "peak_activations_by_scope": dict(self._peak.scopes),
            "category_max": dict(self._category_max),
            "current": current,
            "regions": [region.as_dict() for region in self._regions],
            "allocator_peak_bytes": self._allocator_peak,
        }
