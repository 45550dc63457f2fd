"""SparseTuner: the IST controller, usable from any training loop.

Per optimizer step::

    tuner.begin_step()        # fine-tuning loop: pick S (the rule; IST: eq. 6-7), freeze every other layer's adapters
    loss.backward()
    tuner.before_optimizer_step()   # only rules that watch gradients ('gradnorm') need it; cheap otherwise
    optimizer.step(); optimizer.zero_grad()
    tuner.end_step()          # every T_c steps: importance-updating loop (eq. 8-10)

Which layers train is the selection rule's (:mod:`istune.core.selection`): ``config.strategy``
names one in the registry (:mod:`istune.core.rules`), or ``SparseTuner(..., rule=obj)`` passes
one. Every ``switch_interval`` (K) steps the tuner asks it with a :class:`StepView`, whose
measurements (probe losses, gradient norms, outlier ratios) are computed only when the rule calls
them, on one probe batch per step; in between it keeps the rule's last selection. It checks every
selection (:func:`~istune.core.selection.check_selection`), keeps the rule's state in its own
(``state_dict()["rule"]``) and, for a rule with ``wants_gradients``, reports the gradient norms
of the layers that trained. IST's importance-updating loop runs here, for the rule that sets
``runs_importance_probes``.

Freezing happens before the forward pass, so autograd saves nothing for frozen
adapters and they get no gradient (``grad is None``): the optimizer never moves them,
no momentum, no weight decay. The optimizer itself must hold every adapter parameter
(build it before the first ``begin_step``), so a layer chosen later can train.

Every step, the decoder blocks below the lowest selected layer run without autograd (they
need no backward pass), and under transformers' gradient checkpointing the blocks from the
lowest selected one upward are checkpointed (:mod:`istune.core.activation_checkpointing`). Memory
options: ``recompute_unselected`` checkpoints the activations of the layers not selected
(without transformers' checkpointing); ``stored_layers`` says how many of the layers that run
the backward pass keep their activations, the others being recomputed (with or without it);
``unselected_optimizer_state`` (:mod:`istune.core.optimizer_state`) keeps, offloads or drops
the optimizer state of the layers not selected.

Under torch.distributed every rank runs its own tuner; probe losses are averaged over
ranks and the state is compared across ranks at the first step and at every importance
update (:mod:`istune.core.distributed`), so all ranks train the same layers.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from istune.config import ISTConfig
from istune.core import distributed, measures, policy, sharding
from istune.core.activation_checkpointing import LayerCheckpointing
from istune.core.checks import (
    check_optimizer_holds,
    refuse_merged_adapters,
    refuse_reentrant_checkpointing_under_ddp,
    warn_about_parameters_outside_layers,
)
from istune.core.layers import AdapterLayer, block_lists, find_adapter_layers
from istune.core.optimizer_state import UnselectedOptimizerState
from istune.core.probe import LossFn, default_loss, keep_quantized_layers_trainable, move_to_device, probe_mode
from istune.core.rules import AllLayersRule
from istune.core.selection import SelectionRule, StepView, check_selection, rule_factory
from istune.core.suppress import prepare_suppression, suppress_layers

logger = logging.getLogger(__name__)


class SparseTuner:
    """Chooses, every optimizer step, which layers' adapters train, and learns layer importance.

    Args:
        model: the PEFT model. A DDP wrapper is accepted if built with
            ``find_unused_parameters=True`` (checked); the tuner works on the module inside.
        config: the IST hyperparameters.
        probe_batches: called for a probe batch when an importance update is due and
            :meth:`end_step` got none, and when the rule asks for a measurement (once per step).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for probes; default ``model(**batch).loss``.
        optimizer: if given, checked to hold every adapter parameter. Required when
            ``config.unselected_optimizer_state`` is 'offload' or 'drop'.
        rule: a selection rule object (:class:`~istune.core.selection.SelectionRule`) to use instead
            of the one ``config.strategy`` names; N_u still comes from the config.

    Attributes:
        importance: ``(N_L,)`` float64 importance vector I (zeros at the start).
        selected: layer positions trained in the current step.
        step: optimizer steps completed.
        layers: the adapter layers found in the model (position j = ``layers[j]``).
        rule: the selection rule; ``rule_name`` its name.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ISTConfig | None = None,
        *,
        probe_batches: Callable[[], Any] | None = None,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        rule: SelectionRule | None = None,
    ):
        model = distributed.unwrap_ddp(model)  # refuses a DDP wrapper that cannot skip frozen adapters
        self.model = model
        self.config = config or ISTConfig()
        self.rule = rule if rule is not None else build_rule(self.config)
        self.rule_name = _rule_name(self.rule)
        self.layers: list[AdapterLayer] = find_adapter_layers(model, self.config.layers_path,
                                                              self.config.towers)
        self.counts = self.config.resolve(len(self.layers))  # N_u and N_v against N_L
        self._prepare_model()
        self._optimizer_state = self._unselected_optimizer_state(optimizer)
        blocks, segments = _all_blocks(model, self.layers)
        self._checkpointing = LayerCheckpointing(blocks, self.config.recompute_unselected, self.config.stored_layers,
                                                 segments)
        warn_about_parameters_outside_layers(model, self.layers)
        self.probe_batches = probe_batches
        self.loss_fn = loss_fn or default_loss
        self.importance = torch.zeros(len(self.layers), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.selected: list[int] = list(range(len(self.layers)))
        self.step = 0
        self.history: list[dict] = []  # events since the integration last drained them
        self._synced_once = False  # ranks compared at the first step (fresh or resumed), then at every update
        self._mask_hook = self._keep_mask_before_forward()
        logger.info("IST: %d adapter layers (N_L), training %d per step (N_u), strategy %r",
                    self.num_layers, self.counts.update_layers, self.rule_name)

    def _prepare_model(self) -> None:
        """Refuse what IST cannot train in this model; prepare quantized layers and suppression (eq. 8)."""
        refuse_merged_adapters(self.layers)
        suppresses = self.rule.runs_importance_probes or self.rule.uses_probe_losses
        sharding.check_fsdp2(self.model, self.config, self.layers, self.rule_name, suppresses)  # what FSDP2 refuses
        if keep_quantized_layers_trainable(self.model):  # before the first eval-mode probe forward (bitsandbytes, CPU)
            logger.info("IST: bitsandbytes' CPU repacking of 4-bit layers turned off; it would drop their gradients.")
        self._suppression_prepared = suppresses
        if self._suppression_prepared:
            prepare_suppression(self.model, self.layers)  # refuses what eq. 8 cannot suppress; keeps W0 of full layers

    def _unselected_optimizer_state(self, optimizer: torch.optim.Optimizer | None):
        """Check the optimizer holds every adapter; what keeps, offloads or drops the unselected layers' state."""
        if optimizer is not None:
            check_optimizer_holds(optimizer, self.layers)
        mode = self.config.unselected_optimizer_state
        if mode == "keep":
            return None
        if optimizer is None:
            raise ValueError(f"ISTConfig.unselected_optimizer_state={mode!r} needs the optimizer: pass "
                             "SparseTuner(..., optimizer=optimizer).")
        return UnselectedOptimizerState(optimizer, mode)

    def _keep_mask_before_forward(self):
        """peft's set_adapter / enable_adapter_layers turn requires_grad back on: re-apply it before each forward."""
        if isinstance(self.rule, AllLayersRule):
            return None
        return self.model.register_forward_pre_hook(lambda *_: self._apply_mask())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def uses_probe_batches(self) -> bool:
        """Whether probe batches may be needed: IST's probes, or a rule that may measure (all but those
        declaring ``uses_probe_batches = False``, as 'random', 'fixed', 'all', 'lisa', 'badam')."""
        return self.rule.runs_importance_probes or self.rule.uses_probe_batches

    # ---- fine-tuning loop -------------------------------------------------------------------

    def begin_step(self) -> list[int]:
        """Choose this step's layers S (the rule; IST: eq. 6-7) and freeze the adapters of every other layer."""
        self.selected = self._select_layers()
        self._apply_mask()
        self._clear_unselected_gradients()
        self._checkpointing.select([self.layers[j].index for j in self.selected])
        self._apply_optimizer_state_policy()
        self.history.append({"event": "select", "step": self.step, "selected": list(self.selected)})
        if not self._synced_once:
            self._check_first_step()
        return self.selected

    def end_step(self, probe_batch: Any = None) -> dict | None:
        """Count the optimizer step; every T_c steps run the importance-updating loop.

        Returns the probe record when an update ran (or was skipped), else None.
        """
        self.step += 1
        if not self.rule.runs_importance_probes or self.step % self.config.probe_interval != 0:
            return None
        if probe_batch is None:
            if self.probe_batches is None:
                raise ValueError("An importance update is due but no probe batch was given: pass "
                                 "end_step(probe_batch=...) or SparseTuner(probe_batches=...).")
            probe_batch = self.probe_batches()
        return self.update_importance(probe_batch)

    def _select_layers(self) -> list[int]:
        """S: the rule's selection at steps 0, K, 2K, ... (K = ``switch_interval``), checked; else the last one."""
        if self.step % self.config.switch_interval != 0:
            return list(self.selected)
        count = self.counts.update_layers
        selection = self.rule.select(self._step_view())
        return check_selection(self.rule_name, selection, self.num_layers, count, self.step)

    def _step_view(self) -> StepView:
        """What the rule sees; its measurements run only if called, all on one probe batch per step."""
        batch = []

        def probe_batch() -> Any:
            if not batch:
                if self.probe_batches is None:
                    raise ValueError(f"selection rule {self.rule_name!r} asked for a measurement at step "
                                     f"{self.step}, but the tuner has no probe batches: pass "
                                     "SparseTuner(probe_batches=...) (ISTCallback passes its own).")
                batch.append(self.probe_batches())
            return batch[0]

        def probe_losses(candidates: list[list[int]]) -> torch.Tensor:
            if not self._suppression_prepared:
                self._prepare_suppression_late()
            return self._measured("probe_losses", self.probe_losses(probe_batch(), candidates))

        def gradient_norms() -> torch.Tensor:
            self._checkpointing.select([layer.index for layer in self.layers])  # every block runs its backward
            norms = measures.gradient_norms(self.model, self.layers, probe_batch(), self.loss_fn)
            return self._measured("gradient_norms", norms)

        def outlier_ratios(multiplier: float) -> torch.Tensor:
            ratios = measures.outlier_ratios(self.model, self.layers, probe_batch(), multiplier, self.loss_fn)
            return self._measured("outlier_ratios", ratios)

        return StepView(step=self.step, num_layers=self.num_layers, count=self.counts.update_layers,
                        previous=tuple(self.selected) if self.step > 0 else (), generator=self.generator,
                        importance=self.importance, probe_losses=probe_losses, gradient_norms=gradient_norms,
                        outlier_ratios=outlier_ratios)

    def _measured(self, what: str, values: torch.Tensor) -> torch.Tensor:
        """Log a measurement the rule asked for (a "measure" event) and hand it back."""
        self.history.append({"event": "measure", "step": self.step, "what": what,
                             "values": torch.as_tensor(values).flatten().tolist()})
        return values

    def _prepare_suppression_late(self) -> None:
        """Suppression (eq. 8) for a rule that asks for probe losses without saying so in advance."""
        if self.step > 0 and any(layer.is_full_layer for layer in self.layers):
            raise ValueError(f"selection rule {self.rule_name!r} asked for probe losses at step {self.step}, but "
                             "suppressing full layers needs their initial weights, which are gone by now; set "
                             "`uses_probe_losses = True` on the rule so the tuner keeps them from the start.")
        prepare_suppression(self.model, self.layers)
        self._suppression_prepared = True

    def before_optimizer_step(self) -> dict[int, float] | None:
        """Tell a rule that ``wants_gradients`` the adapter-gradient norm of each layer that trained this step.

        Call after the backward pass (and a gradient scaler's ``unscale_``), before ``optimizer.step()``.
        A step with a NaN/inf norm is not reported. Costs nothing for the other rules.

        Returns:
            ``{position: norm}`` as reported, or None when nothing was reported.
        """
        if not self.rule.wants_gradients:
            return None
        norms = measures.layer_gradient_norms(self.layers, self.selected)
        if not all(math.isfinite(norm) for norm in norms.values()):
            return None
        self.rule.observe_gradients(self.step, norms)
        self.history.append({"event": "gradients", "step": self.step, "layers": list(norms),
                             "norms": list(norms.values())})
        return norms

    def _apply_mask(self) -> None:
        """requires_grad on for the selected layers' adapters, off for the others (before the forward pass)."""
        selected = self._selected_set
        for position, layer in enumerate(self.layers):
            train = position in selected
            for parameter in layer.parameters:
                if parameter.requires_grad != train:
                    parameter.requires_grad_(train)

    @property
    def _selected_set(self) -> set[int]:
        return set(self.selected)

    def _clear_unselected_gradients(self) -> None:
        """Drop the gradients a frozen adapter may still hold, so the optimizer cannot move it."""
        selected = self._selected_set
        for position, layer in enumerate(self.layers):
            if position not in selected:
                for parameter in layer.parameters:
                    parameter.grad = None

    def _apply_optimizer_state_policy(self) -> None:
        """Keep, offload or drop the optimizer state of the layers not selected (``unselected_optimizer_state``)."""
        if self._optimizer_state is None:
            return
        selected = self._selected_set
        self._optimizer_state.apply(
            selected=[p for j, layer in enumerate(self.layers) if j in selected for p in layer.parameters],
            unselected=[p for j, layer in enumerate(self.layers) if j not in selected for p in layer.parameters],
        )

    def _check_first_step(self) -> None:
        """At the first step, fresh or resumed: refuse reentrant checkpointing under DDP, compare the ranks."""
        refuse_reentrant_checkpointing_under_ddp(self._checkpointing.reentrant_in_use())
        self.check_in_sync()
        self._synced_once = True

    # ---- importance-updating loop -------------------------------------------------------------

    def update_importance(self, batch: Any) -> dict:
        """Probe N_c candidate sets on one batch and update the importance (eq. 8-10)."""
        candidates = policy.sample_candidates(
            self.importance, self.counts.probe_layers, self.config.num_probes, self.generator
        )
        losses = self.probe_losses(batch, candidates)
        record = {"event": "probe", "step": self.step, "candidates": candidates, "losses": losses.tolist()}
        if not bool(torch.isfinite(losses).all()):
            logger.warning("IST: non-finite probe loss %s at step %d; importance update skipped.%s",
                           losses.tolist(), self.step, _why_non_finite(batch))
            record["skipped"] = True
        else:
            rewards = policy.rewards_from_losses(losses, self.config.reward_scale)
            self.importance = policy.update_importance(self.importance, candidates, rewards, self.config.mu)
            record["rewards"] = rewards.tolist()
        record["importance"] = self.importance.tolist()
        self.history.append(record)
        self.check_in_sync()
        return record

    def probe_losses(self, batch: Any, candidates: list[list[int]]) -> torch.Tensor:
        """Loss L_j of the model with adapters outside each candidate S_c^j scaled by β (eq. 8).

        Under torch.distributed the losses are averaged over ranks (each rank probes its own
        batch), bitwise identically, so every rank applies the same update.
        """
        device = next(self.model.parameters()).device
        batch = move_to_device(batch, device)
        losses = []
        with probe_mode(self.model):
            for candidate in candidates:
                kept = set(candidate)
                suppressed = [layer for j, layer in enumerate(self.layers) if j not in kept]
                with suppress_layers(suppressed, self.config.beta):
                    losses.append(self.loss_fn(self.model, batch).detach().float())
        losses = distributed.mean_over_ranks(torch.stack(losses).to(distributed.collective_device(device)))
        return losses.cpu().to(torch.float64)

    def check_in_sync(self) -> None:
        """Under torch.distributed, raise ``RuntimeError`` on every rank unless all ranks hold the same
        step, importance, selection and RNG state. Every rank must call it at the same point."""
        if distributed.world_size() == 1:
            return
        fields = {
            "step": torch.tensor([self.step]),
            "importance": self.importance,
            "selection": torch.tensor(self.selected, dtype=torch.int64),
            "RNG state": self.generator.get_state(),
            "rule state": torch.tensor(list(_rule_state_json(self.rule).encode()), dtype=torch.uint8),
        }
        device = distributed.collective_device(next(self.model.parameters()).device)
        distributed.check_in_sync(fields, self.step, device)

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: importance, RNG state, step, selection, the rule's state."""
        return {
            "num_layers": self.num_layers,
            "strategy": self.rule_name,
            "importance": self.importance.clone(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "selected": list(self.selected),
            "rule": self.rule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output; everything is checked before anything changes.

        Raises:
            ValueError: the state is for another layer count, or is malformed.
        """
        missing = [key for key in ("num_layers", "importance", "generator", "step", "selected") if key not in state]
        if missing:
            raise ValueError(f"IST state lacks {missing}; it was not written by SparseTuner.state_dict().")
        if state["num_layers"] != self.num_layers:
            raise ValueError(f"IST state is for a model with N_L={state['num_layers']} adapter layers, but this model "
                             f"has {self.num_layers}; resume with the same model and adapter configuration.")
        importance = torch.as_tensor(state["importance"], dtype=torch.float64)
        if importance.shape != (self.num_layers,) or not bool(torch.isfinite(importance).all()):
            raise ValueError(f"IST state has an invalid importance vector {importance.tolist()}")
        selected, step = state["selected"], state["step"]
        if not (isinstance(step, int) and step >= 0 and isinstance(selected, list)
                and all(isinstance(i, int) and 0 <= i < self.num_layers for i in selected)):
            raise ValueError(f"IST state has an invalid step {step!r} or selection {selected!r}.")
        generator = torch.Generator()
        try:
            generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"IST state has an invalid RNG state ({error}).") from None
        same_rule = state.get("strategy", self.rule_name) == self.rule_name
        if not same_rule:
            logger.warning("IST state was saved with strategy %r, this run uses %r; continuing from its importance, "
                           "the rule starts afresh.", state["strategy"], self.rule_name)
        elif state.get("rule") is not None:  # states of earlier versions have none: the rules they had keep none
            self.rule.load_state_dict(state["rule"])
        self.importance = importance.clone()
        self.generator = generator
        self.step = step
        self.selected = list(selected)
        self._synced_once = False

    def close(self) -> None:
        """Make every adapter parameter trainable again, remove the mask hook and the checkpointing wrappers."""
        if self._mask_hook is not None:
            self._mask_hook.remove()
            self._mask_hook = None
        if self._checkpointing is not None:
            self._checkpointing.remove()
            self._checkpointing = None
        for layer in self.layers:
            for parameter in layer.parameters:
                parameter.requires_grad_(True)


def build_rule(config: ISTConfig) -> SelectionRule:
    """The rule ``config.strategy`` names, built by its registered factory with ``factory(config)`` (or ``factory()``).

    Raises:
        ValueError: no rule has that name (the message lists them), or the factory built no SelectionRule.
    """
    factory = rule_factory(config.strategy)
    try:
        takes_config = bool(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: try the config
        takes_config = True
    rule = factory(config) if takes_config else factory()
    if not isinstance(rule, SelectionRule):
        raise ValueError(f"the factory registered for strategy {config.strategy!r} returned {rule!r}, not a "
                         "SelectionRule; register a SelectionRule subclass or a function returning one.")
    return rule


def _rule_name(rule: SelectionRule) -> str:
    if not isinstance(rule, SelectionRule):
        raise TypeError(f"a selection rule must be an istune.core.selection.SelectionRule (subclass it and implement "
                        f"select(view)), not {type(rule).__name__}.")
    return rule.name or type(rule).__name__


def _rule_state_json(rule: SelectionRule) -> str:
    return json.dumps(rule.state_dict(), sort_keys=True, default=str)


def _all_blocks(model: nn.Module, layers: list[AdapterLayer]) -> tuple[list[nn.Module], list[int]]:
    """Every block of the layer lists the adapter layers belong to (a tower's, then the language model's), those
    without adapters included, in ``layer.index`` order; and the list each block belongs to (0, 1, ...)."""
    lists = [list(blocks) for _, blocks in block_lists(model, layers)]
    return [block for blocks in lists for block in blocks], [k for k, blocks in enumerate(lists) for _ in blocks]


def _why_non_finite(batch: Any) -> str:
    """A hint for a non-finite probe loss when the batch explains it."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if isinstance(labels, torch.Tensor) and not bool((labels != -100).any()):
        return " The probe batch has no target tokens (every label is -100, e.g. all padding or all prompt)."
    return ""
