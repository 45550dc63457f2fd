"""`istune train` options: the Trainer's own (one name per knob), model loading (QLoRA on CPU), bad input refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from istune.cli import _parse_train, main
from istune.recipe import training_args

from .conftest import train_args


def test_bare_command_is_the_main_job():
    run, model_args, adapter, ist, training = _parse_train([])
    assert (run.model, run.data, run.train_samples, run.eval_limit) == ("smollm2-135m", "commonsense", 2000, 24)
    assert (adapter.method, adapter.rank, ist.strategy, ist.seed) == ("lora", 32, "ist", 42)
    assert (training.max_steps, training.per_device_train_batch_size, training.learning_rate) == (80, 4, 3e-4)
    assert (training.output_dir, training.save_strategy.value, training.report_to, training.seed) == (
        "runs/istune", "no", [], 42)
    assert training.get_warmup_steps(80) == 4 and model_args.dtype == "auto" and not model_args.trust_remote_code


def test_one_seed_unless_ist_seed_is_given():
    *_, ist, training = _parse_train(["--seed", "7"])
    assert ist.seed == training.seed == 7
    *_, ist, training = _parse_train(["--seed", "7", "--ist_seed", "3"])
    assert (ist.seed, training.seed) == (3, 7)


def test_config_file_reaches_every_dataclass(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: some/model\ndtype: bfloat16\nmethod: dora\nmu: 100\nnum_train_epochs: 3\n"
                      "max_steps: -1\ngradient_accumulation_steps: 4\nlearning_rate: 2.0e-4\nseed: 5\n")
    run, model_args, adapter, ist, training = _parse_train(["--config", str(config), "--learning_rate", "1e-4"])
    assert ((run.model, model_args.dtype, adapter.method, ist.mu, ist.seed)
            == ("some/model", "bfloat16", "dora", 100, 5))
    assert (training.num_train_epochs, training.max_steps, training.gradient_accumulation_steps) == (3, -1, 4)
    assert training.learning_rate == 1e-4 and training.seed == 5


def test_istune_copies_of_trainer_options_are_gone(capsys):
    with pytest.raises(SystemExit):
        _parse_train(["--batch_size", "2"])
    assert "unrecognised arguments: --batch_size 2" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--load_in_4bit", "--method", "full"], "--load_in_4bit=True with --method=full: whole layers cannot train"),
    (["--load_in_8bit", "--method", "series"], "--load_in_8bit=True with --method=series"),
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit=True and --load_in_8bit=True: choose one"),
    (["--fp16", "--bf16"], "--fp16=True and --bf16=True: choose one mixed precision"),
    (["--dtype", "float8"], "--dtype='float8' is not a weight dtype; use one of auto, bfloat16, float16, float32"),
    (["--max_steps", "0"], "--max_steps=0 must be at least 1, or -1 with --num_train_epochs above 0"),
    (["--generation_batch_size", "0"], "--generation_batch_size=0 must be at least 1"),
])
def test_bad_input_is_refused_before_the_model_loads(tiny_llama_dir, data_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_output_dir_under_a_file_is_refused_before_any_work(tiny_llama_dir, data_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(train_args(tiny_llama_dir, data_file, blocker / "run")) == 2
    error = capsys.readouterr().err.strip()
    assert f"--output_dir={str(blocker / 'run')!r} cannot be created: {str(blocker)!r} is a file" in error
    assert len(error.splitlines()) == 1 and blocker.read_text() == ""


def test_bf16_on_a_cpu_without_it_is_refused(tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training_args, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(training_args, "_has_accelerator", lambda: False)
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, "--bf16")) == 2
    error = capsys.readouterr().err
    assert "--bf16=True on a CPU without bfloat16 arithmetic (AVX512-BF16 or AMX)" in error
    assert "Drop --bf16 (float32 on CPU) or train on a GPU" in error and not out.exists()


@pytest.mark.skipif(not training_args.cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_autocast_trains_on_a_cpu_that_has_it(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, "--bf16", "--compare_base", "false")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["bf16"] and results["importance"] != [0.0, 0.0]


def test_held_out_loss_during_training(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, "--eval_strategy", "steps", "--eval_steps", "2",
                           "--compare_base", "false")) == 0
    history = json.loads((out / "results.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [2, 4]


@pytest.mark.parametrize("quantization", ["--load_in_4bit", "--load_in_8bit"])
def test_qlora_trains_the_selected_layers_and_reloads(tiny_llama_dir, data_file, tmp_path, quantization):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, quantization, "--activation_checkpointing",
                           "--learning_rate", "1e-2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_loading"][quantization[2:]] is True
    assert results["tuned"]["heldout_loss"] < results["base"]["heldout_loss"]
    events = [json.loads(line) for line in (out / "ist_log.jsonl").read_text().splitlines()]
    assert [len(e["selected"]) for e in events if e["event"] == "select"] == [1, 1, 1, 1]
    assert any(e["event"] == "probe" for e in events) and any(v != 0 for v in results["importance"])
    # `istune eval` loads the base quantized again, as saved, and gets the same held-out loss.
    assert main(["eval", str(out)]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["tuned"]["heldout_loss"] == pytest.approx(results["tuned"]["heldout_loss"], rel=1e-4)


def test_qlora_base_weights_are_4bit(tiny_llama_dir):
    from istune.models import ModelArgs, load_model_and_tokenizer, loading_kwargs

    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), **loading_kwargs(ModelArgs(load_in_4bit=True)))
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.quant_state.quant_type == "nf4"
    assert model.lm_head.weight.dtype == torch.float32


def _lora_gradients(model_dir, forward_in_eval_first: bool, keep_trainable: bool):
    import peft

    from istune.core.probe import keep_quantized_layers_trainable
    from istune.models import ModelArgs, load_model_and_tokenizer, loading_kwargs

    model, _ = load_model_and_tokenizer(str(model_dir), **loading_kwargs(ModelArgs(load_in_4bit=True)))
    if keep_trainable:
        # 14 Linear4bit layers, where bitsandbytes would repack
        assert keep_quantized_layers_trainable(model) in (0, 14)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                       init_lora_weights=False))
    ids = torch.randint(4, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    if forward_in_eval_first:  # as an IST probe or an evaluation does
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_4bit_layers_pass_gradients_after_an_eval_forward(tiny_llama_dir):
    reference = _lora_gradients(tiny_llama_dir, forward_in_eval_first=False, keep_trainable=False)
    after_probe = _lora_gradients(tiny_llama_dir, forward_in_eval_first=True, keep_trainable=True)
    assert after_probe.keys() == reference.keys() and len(reference) == 12  # 2 layers x 3 modules x (A, B)
    for name in reference:
        torch.testing.assert_close(after_probe[name], reference[name], rtol=0, atol=0)


def test_packed_labelled_batches_train_as_padded_ones(tiny_llama_dir, data_file, tmp_path):
    """--padding_free and --labelled_logits_only (the defaults) change the work, not the training."""
    runs = {}
    for layout in ("true", "false"):
        out = tmp_path / layout
        assert main(train_args(tiny_llama_dir, data_file, out, "--padding_free", layout, "--labelled_logits_only",
                               layout, "--lora_dropout", "0", "--compare_base", "false")) == 0
        runs[layout] = json.loads((out / "results.json").read_text())
        runs[layout]["adapter_weights"] = load_file(out / "adapter" / "adapter_model.safetensors")
    packed, padded = runs["true"], runs["false"]
    assert packed["batch_layout"] == {"padding_free": True, "labelled_logits_only": True}
    assert padded["batch_layout"] == {"padding_free": False, "labelled_logits_only": False}
    losses = lambda run: [entry["loss"] for entry in run["log_history"] if "loss" in entry]  # noqa: E731
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-4)
    assert packed["importance"] == pytest.approx(padded["importance"], rel=1e-3, abs=1e-6)
    assert packed["tuned"]["heldout_loss"] == pytest.approx(padded["tuned"]["heldout_loss"], rel=1e-4)
    for name, weight in padded["adapter_weights"].items():
        torch.testing.assert_close(packed["adapter_weights"][name], weight, rtol=1e-3, atol=1e-5)


def test_label_smoothing_keeps_every_logit(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, "--label_smoothing_factor", "0.1", "--max_steps", "1",
                           "--compare_base", "false")) == 0
    assert json.loads((out / "results.json").read_text())["batch_layout"] == {"padding_free": True,
                                                                             "labelled_logits_only": False}
    assert "--labelled_logits_only off: --label_smoothing_factor=0.1 needs every logit." in capsys.readouterr().out


def test_save_steps_alone_means_checkpoints_every_k_steps(tmp_path, capsys):
    *_, training = _parse_train(["--save_steps", "3"])
    assert (training.save_strategy.value, training.save_steps) == ("steps", 3)
    assert "saving a checkpoint every 3 steps" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("save_steps: 5\n")
    *_, training = _parse_train(["--config", str(config)])
    assert (training.save_strategy.value, training.save_steps) == ("steps", 5)
    *_, training = _parse_train(["--save_strategy=steps", "--save_steps=2"])
    assert (training.save_strategy.value, training.save_steps) == ("steps", 2)
    *_, training = _parse_train([])  # the default stays: no checkpoints
    assert training.save_strategy.value == "no"


@pytest.mark.parametrize("strategy", ["no", "epoch"])
def test_save_steps_with_a_strategy_that_ignores_it_is_refused(strategy):
    with pytest.raises(ValueError, match=f"--save_steps=3 has no effect with --save_strategy={strategy}"):
        _parse_train(["--save_strategy", strategy, "--save_steps", "3"])
