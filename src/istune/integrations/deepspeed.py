"""IST under DeepSpeed ZeRO-2 and ZeRO-3 in the Trainer: unselected adapters stay exactly where they are.

    trainer = Trainer(model=peft_model, args=TrainingArguments(..., deepspeed="ds_zero3.json"), train_dataset=ds)
    add_ist(trainer, ISTConfig())   # the one-line Trainer(callbacks=[ISTCallback()]) is refused under DeepSpeed

What ZeRO does with a parameter IST froze (deepspeed 0.19.8, ``runtime/zero/stage_1_and_2.py``
and ``stage3.py``): every parameter trainable when the engine is built lives in a flat fp32
partition of its optimizer param group; a frozen one gets no gradient in the backward pass, but
the partition's gradient is built with zeros in its place, and ``step()`` hands the torch
optimizer every group's partition. AdamW then moves the frozen adapters (weight decay, and the
moments of earlier steps) and updates their moments with zeros. ZeRO calls the torch optimizer
once per param group (ZeRO-2: ``param_groups`` cut to that group; ZeRO-3: the other groups'
``params`` emptied), and torch's optimizers skip a parameter whose ``grad`` is None.

So, under DeepSpeed, :func:`prepare_trainer` (called by :func:`istune.add_ist`):

* splits the optimizer the Trainer builds into one param group per layer (and per original
  group: decay and no decay), each tagged with its layer position (:data:`LAYER_KEY`), while
  every adapter is still trainable (ZeRO would leave a parameter frozen then out for good);
* registers a step pre-hook on that torch optimizer that sets the partition gradient of every
  group of an unselected layer to None, and a post-hook that puts it back
  (:class:`UnselectedGroupsSkipped`): those partitions, and their Adam moments and step
  counts, stay exactly untouched, as ``grad is None`` does without DeepSpeed;
* makes every adapter trainable while a checkpoint is saved (transformers saves a peft model
  under ZeRO with ``exclude_frozen_parameters=True``);
* replaces the NaN/inf guard: accelerate runs the engine's step inside ``backward``, before
  ``on_pre_optimizer_step``, and ZeRO keeps gradients in its partitions, not in ``.grad``. ZeRO
  itself skips a step whose global gradient norm is not finite (fp32, and bf16 with
  ``check_grad_overflow``, the default); :class:`istune.integrations.step_guard.SkippedSteps`
  counts the engine's skipped steps and stops training after ten in a row.

Refused before training (:func:`check_deepspeed_config`, :func:`check_ist_options`): an optimizer
in the DeepSpeed config, ZeRO stages other than 2 and 3, parameter or optimizer offload, and
``unselected_optimizer_state`` other than 'keep'; rules that read gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from istune.config import ISTConfig
from istune.core.checks import check_optimizer_holds
from istune.core.layers import AdapterLayer, find_adapter_layers
from istune.core.selection import SelectionRule
from istune.core.tuner import build_rule
from istune.integrations import trainer_internals

logger = logging.getLogger(__name__)

LAYER_KEY = "istune_layer"  # in an optimizer param group: the position of the layer whose adapters it holds
TESTED_STAGES = (2, 3)


def is_deepspeed(args=None, trainer=None, accelerator_state=None) -> bool:
    """True when the Trainer trains (or will train) through a DeepSpeed engine."""
    return bool(trainer_internals.is_deepspeed_enabled(trainer) or getattr(args, "deepspeed", None)
                or getattr(args, "deepspeed_plugin", None) is not None  # also set by accelerate's config file
                or getattr(accelerator_state, "deepspeed_plugin", None) is not None)


def deepspeed_config(trainer) -> dict:
    """The DeepSpeed configuration the Trainer's engine is (to be) built with ({} when unknown)."""
    plugin = getattr(trainer_internals.accelerator_state(trainer), "deepspeed_plugin", None)
    if plugin is None:
        plugin = getattr(trainer.args, "deepspeed_plugin", None)
    return dict(getattr(plugin, "deepspeed_config", None) or {})


def check_deepspeed_config(config: dict) -> None:
    """Refuse DeepSpeed settings IST is not tested with or cannot keep exact.

    Raises:
        NotImplementedError: an ``optimizer`` section, a ZeRO stage other than 2 or 3, or offload.
    """
    if "optimizer" in config:
        raise NotImplementedError(
            f"DeepSpeed config 'optimizer' = {config['optimizer']!r}: IST needs the Trainer to build the optimizer "
            "(one param group per layer, so an unselected layer's partition can be skipped); DeepSpeed's own "
            "optimizer holds every adapter in one group. Remove the 'optimizer' section and choose the optimizer "
            "with TrainingArguments(optim=..., learning_rate=..., weight_decay=...).")
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in TESTED_STAGES:
        raise NotImplementedError(
            f"DeepSpeed zero_optimization.stage = {stage!r}: istune is tested with ZeRO stages 2 and 3 only. Use "
            "stage 2 or 3 (configs/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml), or DDP.")
    for section in ("offload_param", "offload_optimizer"):
        device = (zero.get(section) or {}).get("device", "none")
        if device not in (None, "none"):
            raise NotImplementedError(
                f"DeepSpeed zero_optimization.{section}.device = {device!r}: ZeRO offload is untested with IST "
                "(its CPU optimizer steps partitions outside torch's optimizer, where IST skips unselected layers). "
                f"Remove zero_optimization.{section}, or shard with FSDP2 and its cpu_offload.")


def check_ist_options(config: ISTConfig, rule: SelectionRule | None = None) -> None:
    """Refuse IST options that do not work under DeepSpeed.

    Raises:
        NotImplementedError: ``unselected_optimizer_state`` other than 'keep'; a rule that reads gradients.
    """
    if config.unselected_optimizer_state != "keep":
        raise NotImplementedError(
            f"ISTConfig.unselected_optimizer_state = {config.unselected_optimizer_state!r} under DeepSpeed: ZeRO "
            "keeps the optimizer state in its own flat partitions, which IST cannot offload or drop per layer. Use "
            "'keep' (the default); ZeRO already partitions the state over the ranks.")
    if rule is not None and (rule.wants_gradients or rule.uses_gradient_norms):
        raise NotImplementedError(
            f"selection rule {rule.name!r} reads adapter gradients, which ZeRO keeps in its partitions (an extra "
            "backward pass would also reach ZeRO's gradient hooks). Use a rule that needs no gradients under "
            "DeepSpeed ('ist', 'random', 'lisa', 'owlore', probe-once with probe_by='suppression'), or use DDP.")


def split_param_groups_by_layer(optimizer: torch.optim.Optimizer, layers: list[AdapterLayer]) -> None:
    """Split ``optimizer``'s param groups in place: one per (original group, layer), tagged with :data:`LAYER_KEY`.

    Parameters outside the layers keep a group of their own, untagged (they train every step). Each
    new group keeps its original group's options (weight decay, learning rate, ...).

    Raises:
        ValueError: the optimizer has state already, or does not hold every adapter parameter
            (:func:`istune.core.checks.check_optimizer_holds`).
    """
    if optimizer.state:
        raise ValueError("IST under DeepSpeed must split the optimizer's param groups per layer before its first "
                         "step, but it has state already: build it afresh (do not step it before training).")
    check_optimizer_holds(optimizer, layers)
    position = {id(p): j for j, layer in enumerate(layers) for p in layer.parameters}
    groups = []
    for group in optimizer.param_groups:
        options = {key: value for key, value in group.items() if key != "params"}
        buckets: dict[int | None, list] = {}
        for parameter in group["params"]:
            buckets.setdefault(position.get(id(parameter)), []).append(parameter)
        for layer in sorted(buckets, key=lambda j: (j is None, j or 0)):
            groups.append({**options, "params": buckets[layer], LAYER_KEY: layer})
    optimizer.param_groups[:] = groups


class UnselectedGroupsSkipped:
    """While the torch optimizer steps, the param groups of unselected layers have no gradient.

    ``selected()`` returns the positions trained this step (None: every layer trains).

    Args:
        optimizer: the torch optimizer ZeRO steps (its groups split by :func:`split_param_groups_by_layer`).
        selected: returns the current selection, or None before IST runs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, selected: Callable[[], Iterable[int] | None]):
        self.selected = selected
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = [optimizer.register_step_pre_hook(self._hide),
                         optimizer.register_step_post_hook(self._restore)]

    def _hide(self, optimizer, args, kwargs) -> None:
        selected = self.selected()
        if selected is None:
            return
        selected = set(selected)
        for group in optimizer.param_groups:
            layer = group.get(LAYER_KEY)
            if layer is None or layer in selected:
                continue
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._hidden.append((parameter, parameter.grad))
                    parameter.grad = None

    def _restore(self, optimizer, args, kwargs) -> None:
        for parameter, gradient in self._hidden:
            parameter.grad = gradient  # ZeRO frees it itself right after the step
        self._hidden.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def prepare_trainer(trainer, config: ISTConfig, rule: SelectionRule | None,
                    selected: Callable[[], Iterable[int] | None]) -> None:
    """Make ``trainer`` build its optimizer per layer and skip the unselected layers' groups (once per Trainer).

    Args:
        trainer: a Trainer set up for DeepSpeed, before ``train()``.
        config: the IST configuration (its ``layers_path`` and ``towers`` find the layers).
        rule: the rule object given to the callback, if any.
        selected: returns the current selection (None before IST runs).

    Raises:
        NotImplementedError: what :func:`check_deepspeed_config` and :func:`check_ist_options` refuse.
    """
    check_deepspeed_config(deepspeed_config(trainer))
    check_ist_options(config, rule if rule is not None else build_rule(config))

    def per_layer(create):
        def create_optimizer_per_layer(*args, **kwargs):
            optimizer = create(*args, **kwargs)  # the Trainer's, or the one it was given (Trainer(optimizers=...))
            if _split_optimizer(optimizer) is None:  # a second train() may get the first one's back, wrapped
                layers = find_adapter_layers(trainer.model, config.layers_path, config.towers)
                split_param_groups_by_layer(optimizer, layers)
                UnselectedGroupsSkipped(optimizer, selected)
                optimizer._istune_per_layer = True
            return optimizer

        return create_optimizer_per_layer

    trainer_internals.replace_method(trainer, trainer_internals.CREATE_OPTIMIZER, per_layer)


def check_optimizer_split(trainer) -> None:
    """Raise unless the engine's torch optimizer was split per layer by :func:`prepare_trainer`."""
    if _split_optimizer(trainer.optimizer) is None:
        raise ValueError(
            "IST under DeepSpeed needs the optimizer the Trainer builds, split per layer, but the DeepSpeed engine "
            "holds another one. Add IST with istune.add_ist(trainer, config) before trainer.train(), and do not pass "
            "Trainer(optimizers=...) or an 'optimizer' section in the DeepSpeed config.")


def _split_optimizer(optimizer):
    """The optimizer split per layer inside ``optimizer``'s wrappers (accelerate's, DeepSpeed's, ZeRO's), or None."""
    while optimizer is not None and not getattr(optimizer, "_istune_per_layer", False):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer
