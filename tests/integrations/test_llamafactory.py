"""IST inside LLaMA-Factory (istune.integrations.llamafactory).

The option handling and the reentrant-checkpointing check run in the main environment; the training run
needs LLaMA-Factory 0.9.5 and its pins, which do not install beside istune's: it runs in the side
environment ``bash scripts/side_env.sh llamafactory`` and skips elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from istune import ISTConfig
from istune.integrations.llamafactory import prepare_args, run_exp_with_ist
from istune.integrations.trainer_checks import uses_reentrant_checkpointing

from ..eval.conftest import WORDS
from ..tiny_models import peft_model, save_tiny_llama

NUM_LAYERS = 4
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "llamafactory" / "smollm2_lora_sft_ist.yaml"


# ---- istune's reentrant check sees LLaMA-Factory's checkpointing wrapper --------------------------------------


def wrap_like_llamafactory(checkpoint_function):
    """A checkpointing function wrapped as LLaMA-Factory 0.9.5 wraps its own (model/model_utils/checkpointing.py):
    a plain function made with ``functools.wraps`` over the ``functools.partial`` of torch's checkpoint. (Its own
    also runs layers without trainable parameters unchecked; it finds the layer in a way transformers 5.24 broke.)"""

    @functools.wraps(checkpoint_function, assigned=functools.WRAPPER_ASSIGNMENTS + ("__self__",))
    def checkpointing_function(function, *args, **kwargs):
        return checkpoint_function(function, *args, **kwargs)

    return checkpointing_function


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_check_sees_through_llamafactorys_wrapper(reentrant):
    model = peft_model("llama", "lora", num_layers=2)
    base = model.get_base_model()
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=reentrant)
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=wrap_like_llamafactory(checkpoint))
    base.enable_input_require_grads()  # as LLaMA-Factory does: the reentrant variant needs inputs that need grad
    functions = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", 0)]
    assert functions and not any(isinstance(f, functools.partial) for f in functions)  # what the check used to miss
    assert uses_reentrant_checkpointing(model) == reentrant
    ids = torch.arange(8).reshape(1, 8)
    model(input_ids=ids, labels=ids).loss.backward()  # the wrapper is a working checkpointing function
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# ---- IST's options and what IST needs in LLaMA-Factory's arguments ----------------------------------------------

BASE_ARGS = {"model_name_or_path": "some/model", "stage": "sft", "finetuning_type": "lora", "output_dir": "out"}


def test_ist_section_is_split_off_and_ist_needs_are_set():
    args = {**BASE_ARGS, "ist": {"update_layers": 2, "mu": 100.0, "layers_path": None}}
    run_args, config = prepare_args(args)
    assert config == ISTConfig(update_layers=2, mu=100.0)
    assert run_args == {**BASE_ARGS, "ddp_find_unused_parameters": True, "use_reentrant_gc": False}
    assert "ist" in args  # the caller's dict is left as it was


@pytest.mark.parametrize("section", [None, {}])
def test_an_empty_ist_section_is_the_papers_defaults(section):
    assert prepare_args({**BASE_ARGS, "ist": section})[1] == ISTConfig()
    assert prepare_args(BASE_ARGS, ist=ISTConfig(strategy="random"))[1] == ISTConfig(strategy="random")


@pytest.mark.parametrize("given", [{"ddp_find_unused_parameters": True, "use_reentrant_gc": False},
                                   {"ddp_find_unused_parameters": None, "use_reentrant_gc": None}])
def test_ist_needs_given_the_right_way_are_kept(given):
    run_args, _ = prepare_args({**BASE_ARGS, **given})
    assert run_args["ddp_find_unused_parameters"] is True and run_args["use_reentrant_gc"] is False


BAD_OPTIONS = [  # (IST options, error type, what the first line of the error says)
    ({"mu": -1}, ValueError, "ISTConfig.mu=-1 is invalid"),
    ({"update_fraction": 2}, ValueError, "ISTConfig.update_fraction=2 is invalid"),
    ({"strategy": "fixed"}, ValueError, "ISTConfig.layers=None is invalid"),
    ({"muu": 1}, ValueError, "ist.muu=1 is not an ISTConfig option; did you mean 'mu'?"),
    (0.25, TypeError, "ist=0.25: IST's options are a mapping"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_a_bad_ist_option_is_refused_with_istconfigs_error(options, error, message):
    with pytest.raises(error, match="^" + _escape(message)):
        prepare_args({**BASE_ARGS, "ist": options})


REFUSED_ARGS = [  # (LLaMA-Factory arguments, what the error names)
    ({"ddp_find_unused_parameters": False}, "ddp_find_unused_parameters=False cannot train with IST"),
    ({"use_reentrant_gc": True}, "use_reentrant_gc=True cannot train with IST"),
    ({"stage": "ppo"}, "stage='ppo' cannot train with IST"),
    ({"use_badam": True}, "use_badam=True cannot train with IST"),
]


@pytest.mark.parametrize("given, message", REFUSED_ARGS)
def test_arguments_ist_cannot_train_with_are_refused(given, message):
    with pytest.raises(ValueError, match="^" + _escape(message)):
        prepare_args({**BASE_ARGS, **given, "ist": {}})


def test_ist_options_given_twice_are_refused():
    with pytest.raises(ValueError, match="given twice"):
        prepare_args({**BASE_ARGS, "ist": {"mu": 1.0}}, ist={"mu": 2.0})


def test_run_exp_with_ist_refuses_a_bad_option_before_llamafactory_starts(tmp_path):
    # Raised before LLaMA-Factory is imported: the same error with and without it installed, and nothing written.
    with pytest.raises(ValueError, match=r"^ISTConfig\.beta=2 is invalid"):
        run_exp_with_ist({**BASE_ARGS, "output_dir": str(tmp_path / "out"), "ist": {"beta": 2}})
    assert not (tmp_path / "out").exists()


def test_the_example_config_runs_with_this_command_and_has_good_ist_options():
    lines = EXAMPLE.read_text().splitlines()
    assert lines[0] == f"# python -m istune.integrations.llamafactory {EXAMPLE.relative_to(ROOT)}"
    run_args, config = prepare_args(yaml.safe_load(EXAMPLE.read_text()))
    assert config == ISTConfig(update_fraction=0.25, probe_fraction=0.5, num_probes=3, probe_interval=10, beta=0.25,
                               mu=10)
    data = ROOT / run_args["dataset_dir"]
    assert run_args["dataset"] in json.loads((data / "dataset_info.json").read_text())


def _escape(text: str) -> str:
    return re.escape(text)


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is not None, reason="LLaMA-Factory is installed here")
def test_without_llamafactory_the_command_says_how_to_install_it_in_one_line(tmp_path, monkeypatch):
    from istune.integrations.llamafactory import main

    monkeypatch.setattr(sys, "argv", ["llamafactory", str(tmp_path / "run.yaml")])
    with pytest.raises(SystemExit) as stopped:  # python -m prints the message alone and exits with 1
        main()
    assert str(stopped.value) == ("python -m istune.integrations.llamafactory: IST in LLaMA-Factory needs "
                                  "LLaMA-Factory (No module named 'llamafactory'); install it beside istune as "
                                  "docs/llamafactory.md says: pip install llamafactory==0.9.5.")


# ---- a training run through LLaMA-Factory (side environment only) ----------------------------------------------


@pytest.fixture(scope="module")
def llamafactory():
    if importlib.util.find_spec("llamafactory") is None:
        pytest.skip("LLaMA-Factory is not installed; run: bash scripts/side_env.sh llamafactory")
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):  # PyPI has no CPU torchaudio for this torch; text training never calls it
        stand_in = types.ModuleType("torchaudio")
        stand_in.__spec__ = importlib.util.spec_from_loader("torchaudio", loader=None)
        sys.modules["torchaudio"] = stand_in
    return pytest.importorskip("llamafactory.train.tuner")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 4-layer LLaMA and a word-level tokenizer, saved as LLaMA-Factory loads them."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), NUM_LAYERS)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """16 alpaca-format examples registered in dataset_info.json as 'tiny', as LLaMA-Factory reads local data."""
    folder = tmp_path_factory.mktemp("llamafactory-data")
    rows = [{"instruction": f"question {WORDS[i + 20]} {WORDS[2 * i + 20]} ?", "input": "",
             "output": f"the correct answer is {'true' if i % 2 else 'false'}"} for i in range(16)]
    (folder / "tiny.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return folder


def _args(tiny_llama, dataset_dir, out, **ist):
    return {
        "model_name_or_path": str(tiny_llama), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 4, "lora_target": "all", "dataset": "tiny", "dataset_dir": str(dataset_dir),
        "template": "default", "cutoff_len": 32, "cache_dir": str(out / "cache"), "output_dir": str(out / "run"),
        "per_device_train_batch_size": 2, "max_steps": 4, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0, "disable_tqdm": True,
        "ist": {"update_layers": 1, "probe_interval": 2, "seed": 0, **ist},
    }


class AdapterRecorder(TrainerCallback):
    """Keeps each decoder layer's LoRA values when training starts and ends, and the checkpointing LLaMA-Factory set.

    Layers are told apart by parameter name (``...layers.<i>...lora_A...``), not by istune's own layer discovery.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.reentrant = uses_reentrant_checkpointing(model)
        self.checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        self.before = self._values()

    def on_train_end(self, args, state, control, **kwargs):
        self.after = self._values()

    def _values(self) -> dict[int, dict[str, torch.Tensor]]:
        values = {}
        for name, parameter in self.model.named_parameters():
            layer = re.search(r"\.layers\.(\d+)\.", name)
            if "lora_" in name and layer:
                values.setdefault(int(layer.group(1)), {})[name] = parameter.detach().clone()
        return values


def test_llamafactory_trains_only_the_layers_ist_selected(llamafactory, tiny_llama, dataset_dir, tmp_path):
    recorder = AdapterRecorder()
    ist = run_exp_with_ist(_args(tiny_llama, dataset_dir, tmp_path), callbacks=[recorder])
    assert ist.tuner.num_layers == NUM_LAYERS and sorted(recorder.before) == list(range(NUM_LAYERS))
    assert recorder.checkpointing and not recorder.reentrant  # LLaMA-Factory's checkpointing, made non-reentrant
    events = [json.loads(line) for line in (tmp_path / "run" / "ist_log.jsonl").read_text().splitlines()]
    selections = [event["selected"] for event in events if event["event"] == "select"]
    assert len(selections) == 4 and all(len(selected) == 1 for selected in selections)
    assert any(event["event"] == "probe" for event in events)
    trained = {i for selected in selections for i in selected}
    assert 0 < len(trained) < NUM_LAYERS  # seed 0: some layer is never selected in 4 steps
    for i in range(NUM_LAYERS):
        moved = {name: not torch.equal(value, recorder.after[i][name]) for name, value in recorder.before[i].items()}
        if i in trained:  # every B moves (A has no gradient while B is still peft's zeros: a layer trained once)
            assert all(changed for name, changed in moved.items() if "lora_B" in name), f"layer {i}: {moved}"
        else:
            assert not any(moved.values()), f"layer {i} was never selected but moved: {moved}"


def test_llamafactory_refuses_a_bad_ist_option_before_training(llamafactory, tiny_llama, dataset_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^ISTConfig\.update_layers=0 is invalid"):
        run_exp_with_ist(_args(tiny_llama, dataset_dir, tmp_path, update_layers=0))
    assert not (tmp_path / "run").exists()


def test_llamafactory_accepts_every_argument_of_the_example(llamafactory):
    from llamafactory.hparams import get_train_args

    run_args, _ = prepare_args(yaml.safe_load(EXAMPLE.read_text()))
    _, data_args, training_args, finetuning_args, _ = get_train_args(run_args)  # refuses any key it does not know
    assert training_args.ddp_find_unused_parameters is True and finetuning_args.finetuning_type == "lora"
    assert data_args.dataset == ["istune_demo"]
