"""The one measuring engine: build a row's model, and run warm-up -> settle -> measured steps under a meter.

    model = build_model(config, row, dtype="float32", device="meta", adapter=dict(rank=8), total_steps=10)
    optimizer = torch.optim.AdamW(trainable(model))
    selections, tuner = measured_steps(model, optimizer, make_batch(...), MemoryTracker(model, optimizer), make_tuner)

The warm-up step trains every layer (AdamW then holds state for all, as late in a long run); the settling
step is the tuner's first, so each measured step starts with what the step before it left. The meters:
:class:`~istune.planning.tracker.MemoryTracker` (live tensor bytes, meta device included), :class:`CudaPeak`
(the allocator's counters) and :class:`RssPeak` (the peak resident set, Linux). :func:`timed_step` is the
one timed step.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from istune.planning.rows import Row

__all__ = ["CudaPeak", "DTYPES", "RssPeak", "build_model", "load_model", "load_model_and_tokenizer", "make_batch",
           "measured_steps", "timed_step", "train_step", "trainable"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(name: str | None, **kwargs):
    """A pretrained model and its tokenizer by hub id, folder or ``smollm2-135m`` (:mod:`istune.models`)."""
    from istune.models import load_model_and_tokenizer as load

    return load(name, **kwargs)


def load_model(name: str | None, **kwargs) -> torch.nn.Module:
    return load_model_and_tokenizer(name, **kwargs)[0]


def build_model(config, row: Row, *, dtype: str = "float32", device: str | torch.device = "cpu",
                seed: int | None = 0,
                adapter=None, total_steps: int = 10, train_embeddings: bool = True, input_grads: bool | None = None,
                base: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model of ``config`` (random weights made on ``device``) with ``row``'s trainable parameters.

    Args:
        config: a transformers config (None with ``model``).
        row: the configuration: full fine-tuning (``full`` without IST), whole layers (``full``, ``lisa``:
            with the embeddings and head when ``train_embeddings``) or adapters of the row's method.
        adapter: AdapterArgs fields (rank, alpha, lora_dropout, ...); default AdapterArgs' defaults.
        base: applied to the bare model before the trainable parts go on (4-bit quantization).
        model: a model already loaded, instead of ``config``.
        input_grads: with checkpointing, turn the embeddings' output gradient on (True, as the Trainer does
            for a peft model), off (False: IST-aware checkpointing) or leave it (None).
    """
    from istune.adapters.methods import AdapterArgs, add_adapters
    from istune.core.layers import prepare_full_layer_tuning

    if seed is not None:  # None: the random state as it is (the caller seeded before loading)
        torch.manual_seed(seed)
    with torch.device(device):
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=DTYPES[dtype])
        if base is not None:
            model = base(model)
        if row.method == "full" and row.ist is None:
            model.requires_grad_(True)  # full fine-tuning: every parameter
        elif row.method == "lisa":
            prepare_full_layer_tuning(model, train_embeddings=train_embeddings, train_head=train_embeddings)
        else:
            model = add_adapters(model, AdapterArgs(**{**(adapter or {}), "method": row.method}), total_steps)
        if row.checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if input_grads is True:
                model.enable_input_require_grads()
            elif input_grads is False:  # IST-aware: layers below the lowest selected one build no graph
                model.disable_input_require_grads()
    return model.train()


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int, attention: str, device) -> dict[str, Any]:
    """Random token ids as a training batch: ``(batch_size, seq_len)`` ids, labels = ids, all attended, no KV cache.

    Eager attention gets an explicit all-ones mask, as in training. SDPA gets none: given an all-ones mask,
    transformers reads its values, finds no padding and drops it, so the fused kernel runs with ``is_causal``
    exactly as without one (on the meta device the values cannot be read).
    """
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}
    if attention != "sdpa":
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    model(**batch).loss.backward()  # the output (logits) is dropped once the loss exists, as in Trainer
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class CudaPeak:
    """The CUDA allocator's peak over the block: ``peak_allocated_bytes`` and ``peak_reserved_bytes``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.allocated, self.reserved = device, None, None

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.allocated = torch.cuda.max_memory_allocated(self.device)
        self.reserved = torch.cuda.max_memory_reserved(self.device)

    def region(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def report(self) -> dict[str, Any]:
        return {"peak_allocated_bytes": self.allocated, "peak_reserved_bytes": self.reserved}


class RssPeak(CudaPeak):
    """Growth of the process's peak resident set (VmHWM, reset on entry) over the resident size on entry; Linux."""

    def __init__(self) -> None:
        self.before = self.peak = None

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field_name}")  # pragma: no cover

    def __enter__(self) -> RssPeak:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # reset the peak resident set size (VmHWM) to the current one
        self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self._status("VmHWM")

    def report(self) -> dict[str, Any]:
        return {"rss_before_bytes": self.before, "peak_rss_bytes": self.peak, "growth_bytes": self.peak - self.before}


def _tuner_step(model, optimizer, batch, tuner) -> list[int] | None:
    selected = list(tuner.begin_step()) if tuner is not None else None
    train_step(model, optimizer, batch)
    if tuner is not None:
        tuner.end_step()
    return selected


def measured_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any], meter,
                   make_tuner: Callable[[], Any] | None = None, steps: int = 1,
                   warm_up: bool = True) -> tuple[list[list[int] | None], Any]:
    """Warm-up (every layer), then the tuner (made by ``make_tuner``) settles for one step, then ``steps`` steps
    run inside ``meter``, one region each.

    Returns the layers each measured step selected (None without a tuner) and the tuner (the caller closes it).
    """
    if warm_up:
        train_step(model, optimizer, batch)
    tuner = make_tuner() if make_tuner is not None else None
    if tuner is not None:
        _tuner_step(model, optimizer, batch, tuner)
    selections = []
    with meter:
        for step in range(steps):
            with meter.region(f"step {step}"):
                selections.append(_tuner_step(model, optimizer, batch, tuner))
    return selections, tuner


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any], tuner=None,
               probe_batch=None, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """One training step timed in parts: ``forward`` (``begin_step`` included), ``backward``, ``optimizer``
    (step and ``zero_grad``), ``step`` (their sum) and ``update`` (``end_step``: an importance update when due,
    probe forwards included; 0 without a tuner). ``sync`` waits for the device (``torch.cuda.synchronize``)."""
    sync()
    t0 = time.perf_counter()
    if tuner is not None:
        tuner.begin_step()
    loss = model(**batch).loss
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    probed = tuner is not None and tuner.end_step(probe_batch=probe_batch) is not None
    sync()
    t4 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0,
            "update": t4 - t3, "probed": probed}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """peft's and transformers' notes about meta tensors and dtypes, silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
