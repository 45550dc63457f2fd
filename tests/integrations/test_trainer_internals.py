"""The Trainer internals istune relies on: all listed in one table, and each still there in this transformers.

The side environments (.ci/envs) run this file under each tool's own transformers.
"""

import ast
import inspect
import json
from pathlib import Path

import pytest
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

import istune
from istune import ISTConfig, add_ist
from istune.integrations import trainer_internals
from istune.integrations.console import ReadablePrinterCallback
from istune.integrations.ist_state import STATE_KEY

from ..tiny_models import peft_model
from .test_hf import TokenDataset, _args

SOURCE = Path(istune.__file__).parent
INTERNALS_MODULE = SOURCE / "integrations" / "trainer_internals.py"
ACCESSORS = {"getattr", "hasattr", "setattr"}


def _is_trainer(node: ast.AST) -> bool:
    """``trainer`` or ``<anything>.trainer``: how istune names a Trainer."""
    return (isinstance(node, ast.Name) and node.id == "trainer") or (
        isinstance(node, ast.Attribute) and node.attr == "trainer")


def trainer_accesses(tree: ast.AST) -> tuple[set[str], int]:
    """The Trainer attributes ``tree`` touches (``trainer.x``, ``getattr(trainer, "x")``), and how many accesses
    name the attribute by a variable (``getattr(trainer, name)``)."""
    names, dynamic = set(), 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_trainer(node.value):
            names.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCESSORS
              and node.args and _is_trainer(node.args[0])):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                names.add(name.value)
            else:
                dynamic += 1
    return names, dynamic


def named_by_constant(tree: ast.AST) -> set[str]:
    """The Trainer attributes named through trainer_internals' constants (``trainer_internals.SAVE_CHECKPOINT``)."""
    return {getattr(trainer_internals, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "trainer_internals" and node.attr.isupper()
            and isinstance(getattr(trainer_internals, node.attr, None), str)}


def package_accesses() -> dict[str, tuple[set[str], int, set[str]]]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found[str(path.relative_to(SOURCE))] = (*trainer_accesses(tree), named_by_constant(tree))
    return found


def test_the_scanner_finds_each_kind_of_access():
    tree = ast.parse("trainer.a\nself.trainer.b()\ngetattr(trainer, 'c', None)\ngetattr(trainer, name)\n"
                     "other.d\nx = trainer_internals.SAVE_CHECKPOINT")
    assert trainer_accesses(tree) == ({"a", "b", "c"}, 1)
    assert named_by_constant(tree) == {"_save_checkpoint"}


def test_the_table_lists_every_trainer_attribute_istune_touches_and_no_other():
    accesses = package_accesses()
    used = set().union(*(names | constants for names, _, constants in accesses.values()))
    listed = set(trainer_internals.TRAINER_ATTRIBUTES)
    assert used - listed == set(), "touched on a Trainer but missing from trainer_internals.TRAINER_ATTRIBUTES"
    assert listed - used == set(), "listed in trainer_internals.TRAINER_ATTRIBUTES but touched nowhere"
    assert {"_save_checkpoint", "_load_optimizer_and_scheduler", "model_wrapped", "accelerator"} <= used


def test_only_trainer_internals_touches_what_is_not_the_trainers_public_api():
    public = {name for name, (is_public, _, _) in trainer_internals.TRAINER_ATTRIBUTES.items() if is_public}
    internals = str(INTERNALS_MODULE.relative_to(SOURCE))
    outside = {module: sorted(names - public) for module, (names, _, _) in package_accesses().items()
               if module != internals and names - public}
    assert outside == {}
    dynamic = {module: count for module, (_, count, _) in package_accesses().items() if module != internals and count}
    assert dynamic == {}, "getattr(trainer, <a variable>) outside trainer_internals: the table cannot see it"


def _short(module: str) -> str:
    """``integrations/hf.py`` -> ``hf``, ``bench/frontier.py`` -> ``bench.frontier``: the table's module names."""
    name = module.removesuffix(".py").replace("/", ".")
    return name.removeprefix("integrations.")


def test_every_row_says_what_istune_does_and_where():
    users: dict[str, set[str]] = {}
    for module, (names, _, constants) in package_accesses().items():
        for name in names | constants:
            users.setdefault(name, set()).add(_short(module))
    for name, (public, use, modules) in trainer_internals.TRAINER_ATTRIBUTES.items():
        assert isinstance(public, bool) and use and modules, name
        if public or name in {"_save_checkpoint", "_load_optimizer_and_scheduler", "create_optimizer"}:
            assert set(modules.split(", ")) == users[name], name  # the modules that touch it themselves
    assert all(use and modules for use, modules in trainer_internals.OTHER_INTERNALS.items())


# ---- each internal, in this transformers -----------------------------------------------------------------------


class EventRecorder(TrainerCallback):
    """Records the step events, whether gradients exist at each, and what on_log finds in the log history."""

    def __init__(self):
        self.events, self.log_entries = [], []

    def _record(self, event, model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.events.append((event, any(p.grad is not None for p in trainable)))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._record("step_begin", model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._record("pre_optimizer_step", model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._record("optimizer_step", model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record("step_end", model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            self.log_entries.append((dict(state.log_history[-1]), state.global_step))


def _trainer(tmp_path, callbacks=(), **overrides):
    model = peft_model("llama", "lora", num_layers=2, seed=0)
    return Trainer(model=model, args=_args(tmp_path, **{"max_steps": 2, **overrides}), train_dataset=TokenDataset(),
                   callbacks=list(callbacks))


def test_the_trainer_has_every_listed_attribute(tmp_path):
    trainer = _trainer(tmp_path)
    missing = [name for name in trainer_internals.TRAINER_ATTRIBUTES if not hasattr(trainer, name)]
    assert missing == []
    assert not trainer_internals.is_deepspeed_enabled(trainer) and not trainer_internals.is_fsdp_enabled(trainer)
    assert trainer_internals.wrapped_model(trainer) is trainer.model  # one process, no wrapper yet
    assert trainer_internals.accelerator_state(trainer) is not None
    assert trainer_internals.shared_accelerator_state() is not None  # the Trainer's accelerator set it up
    assert callable(trainer.accelerator.unscale_gradients)


def test_the_wrapped_methods_keep_the_signatures_istune_calls_them_with():
    assert list(inspect.signature(Trainer._save_checkpoint).parameters)[:3] == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    create = inspect.signature(Trainer.create_optimizer).parameters
    assert all(p.default is not inspect.Parameter.empty for name, p in create.items() if name != "self")


def test_the_trainer_lists_default_flow_first_the_given_callbacks_then_the_printer(tmp_path):
    given = TrainerCallback()
    callbacks = trainer_internals.callback_handler(_trainer(tmp_path, [given])).callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback)
    assert isinstance(callbacks[-1], (PrinterCallback, ProgressCallback))
    assert 0 < callbacks.index(given) < len(callbacks) - 1


def test_add_ist_runs_right_after_default_flow_with_the_readable_printer(tmp_path):
    trainer = _trainer(tmp_path, [TrainerCallback()])
    ist = add_ist(trainer, ISTConfig(update_layers=1))
    callbacks = trainer_internals.callback_handler(trainer).callbacks
    assert callbacks.index(ist) == 1 and isinstance(callbacks[-1], ReadablePrinterCallback)


def test_step_events_come_in_the_order_istune_relies_on(tmp_path):
    """on_pre_optimizer_step sees the gradients, on_step_end comes after zero_grad, on_log finds its log history
    entry appended already (metrics adds the IST values to it)."""
    recorder = EventRecorder()
    trainer = _trainer(tmp_path, [recorder], gradient_accumulation_steps=2)
    trainer.train()
    step = [("step_begin", False), ("pre_optimizer_step", True), ("optimizer_step", True), ("step_end", False)]
    assert recorder.events == step * 2
    assert [(entry["step"], "loss" in entry) for entry, _ in recorder.log_entries] == [(1, True), (2, True)]
    assert all(entry["step"] == global_step for entry, global_step in recorder.log_entries)


def test_replaced_methods_are_the_ones_the_trainer_calls_when_saving_and_resuming(tmp_path):
    calls = []

    def counting(name):
        def wrap(original):
            def counted(*args, **kwargs):
                calls.append(name)
                return original(*args, **kwargs)
            return counted
        return wrap

    def train(output_dir, max_steps, resume=None):
        trainer = _trainer(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2)
        add_ist(trainer, ISTConfig(update_layers=1, probe_interval=1))  # replaces the checkpoint methods
        for name in (trainer_internals.SAVE_CHECKPOINT, trainer_internals.LOAD_OPTIMIZER):
            replaced = getattr(trainer, name)
            trainer_internals.replace_method(trainer, name, counting(name))
            assert getattr(trainer, name) is replaced  # once: istune's replacement is kept
            setattr(trainer, name, counting(name)(replaced))  # a spy around istune's replacement
        # replaced under DeepSpeed only (deepspeed.prepare_trainer): here the same way, counting
        trainer_internals.replace_method(trainer, trainer_internals.CREATE_OPTIMIZER, counting("create_optimizer"))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    train(tmp_path, max_steps=2)
    checkpoint = Path(trainer_internals.checkpoint_folder(str(tmp_path), 2))
    saving = [call for call in calls if call != "_load_optimizer_and_scheduler"]  # called with None, or not at all
    assert saving == ["create_optimizer", "_save_checkpoint"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"][STATE_KEY]["step"] == 2  # TrainerState.stateful_callbacks is saved
    assert (checkpoint / "ist_log.jsonl").exists()
    calls.clear()
    train(tmp_path / "resumed", max_steps=3, resume=str(checkpoint))
    assert calls[:2] == ["create_optimizer", "_load_optimizer_and_scheduler"]  # then the final step's save


@pytest.mark.parametrize("moved", [True, False])
def test_run_after_default_flow_moves_only_a_listed_callback(tmp_path, moved):
    handler = trainer_internals.callback_handler(_trainer(tmp_path, [TrainerCallback()]))
    callback = TrainerCallback()
    if moved:
        handler.callbacks.append(callback)
    before = list(handler.callbacks)
    assert trainer_internals.run_after_default_flow(handler, callback) is moved
    if moved:
        assert handler.callbacks.index(callback) == 1 and sorted(map(id, handler.callbacks)) == sorted(map(id, before))
    else:
        assert handler.callbacks == before
