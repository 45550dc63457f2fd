"""`istune compare` end to end on a tiny model: arms x seeds on shared data and initialisation, resume after a
kill between runs, refusal of mixed options, the report against the runs, and the arms' configs."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from istune.cli import _parse_compare, main
from istune.config import ISTConfig
from istune.recipe import compare as compare_module
from istune.recipe import train as train_module
from istune.recipe.compare import arm_config, parse_arms, parse_seeds, quarter_layers

from ..data.conftest import make_char_tokenizer

TASK = "task:cipher:length=4"


@pytest.fixture(scope="module")
def tiny_char_llama(tmp_path_factory):
    """A 4-layer LLaMA with a character tokenizer, so a task's prompts are read as they are written."""
    folder = tmp_path_factory.mktemp("tiny-char-llama")
    tokenizer = make_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compare_args(model_dir, out, *extra) -> list[str]:
    return ["compare", "--arms", "quarter:1,quarter:4", "--seeds", "2", "--out", str(out), "--model", str(model_dir),
            "--data", TASK, "--max_steps", "4", "--train_samples", "16", "--heldout_samples", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--rank", "4", "--alpha", "8",
            "--eval_limit", "4", "--curve_every", "2", "--compare_base", "false", "--logging_steps", "1",
            "--disable_tqdm", "true", *extra]


def _adapters(folder):
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _layer(weights, index):
    return {name: value for name, value in weights.items() if f".layers.{index}." in name}


def test_two_arms_two_seeds_resume_after_a_kill_and_refuse_mixed_options(tiny_char_llama, tmp_path, monkeypatch,
                                                                       capsys):
    out = tmp_path / "compare"
    real_train, calls = train_module.train, []

    def killed_at_the_third_run(*args, **kwargs):  # call 1 is the time estimate, calls 2-3 the first two runs
        calls.append(args)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", killed_at_the_third_run)
    with pytest.raises(RuntimeError, match="killed"):
        main(compare_args(tiny_char_llama, out))
    printed = capsys.readouterr().out
    assert "4 runs (2 arms x 2 seeds), 0 saved, 4 to make" in printed and "estimate 4 runs x about" in printed
    runs = out / "runs"
    first = {name: (runs / name / "results.json").read_text() for name in ("quarter_1-seed1", "quarter_4-seed1")}
    assert not (runs / "quarter_1-seed2" / "results.json").exists()

    monkeypatch.setattr(train_module, "train", real_train)
    assert main(compare_args(tiny_char_llama, out)) == 0
    printed = capsys.readouterr().out
    assert "2 saved, 2 to make" in printed and "(the mean of the 2 saved)" in printed
    assert {name: (runs / name / "results.json").read_text() for name in first} == first  # reused, not made again
    results = {(arm, seed): json.loads((runs / f"{arm}-seed{seed}" / "results.json").read_text())
               for arm in ("quarter_1", "quarter_4") for seed in (1, 2)}
    assert [results["quarter_1", s]["ist"]["layers"] for s in (1, 2)] == [[0], [0]]
    assert [results["quarter_4", s]["ist"]["layers"] for s in (1, 2)] == [[3], [3]]

    # one seed, one data order and one initialisation for every arm: the first batch's loss (before any update)
    # and the adapters of layers 1-2, which neither arm trains, are equal across arms and differ across seeds
    first_loss = {key: value["log_history"][0]["loss"] for key, value in results.items()}
    assert first_loss["quarter_1", 1] == first_loss["quarter_4", 1] != first_loss["quarter_1", 2]
    weights = {key: _adapters(runs / f"{key[0]}-seed{key[1]}") for key in results}
    for layer in (1, 2):
        a, b, c = (_layer(weights[key], layer) for key in (("quarter_1", 1), ("quarter_4", 1), ("quarter_1", 2)))
        assert a and all(torch.equal(a[name], b[name]) for name in a)
        assert any(not torch.equal(a[name], c[name]) for name in a if "lora_A" in name)
    trained = _layer(weights["quarter_1", 1], 0)  # layer 0 trains in quarter:1 only
    untouched = _layer(weights["quarter_4", 1], 0)
    assert any(not torch.equal(trained[name], untouched[name]) for name in trained if "lora_B" in name)

    # the report against the runs it reads
    report = json.loads((out / "report.json").read_text())
    finals = {key: value["tuned"]["generate"]["average"] for key, value in results.items()}
    for arm, name in (("quarter:1", "quarter_1"), ("quarter:4", "quarter_4")):
        assert report["arms"][arm]["final"][0] == pytest.approx(statistics.fmean(finals[name, s] for s in (1, 2)))
        curve = results[name, 1]["curve"]
        assert [p["step"] for p in curve["points"]] == [0, 2, 4]
        assert curve["points"][-1]["generate"] == finals[name, 1]
    assert report["arms"]["quarter:4"]["selection_by_quarter"] == [0, 0, 0, 1]
    assert (out / "results.md").read_text().startswith("# istune compare") and (out / "curves.png").is_file()

    # mixed options are refused, naming the option and the folder, before any run
    folders = sorted(p.name for p in runs.iterdir())
    assert main(compare_args(tiny_char_llama, out, "--learning_rate", "2e-2")) == 2
    error = capsys.readouterr().err
    assert f"--out={str(out)!r} holds runs made with other options" in error
    assert "training.learning_rate: 0.01 -> 0.02" in error
    assert sorted(p.name for p in runs.iterdir()) == folders
    (out / "compare.json").unlink()  # without the folder's record each saved run is still checked on its own
    assert main(compare_args(tiny_char_llama, out, "--rank", "8")) == 2
    assert "runs/quarter_1-seed1 was made with other options (adapter.rank: 4 -> 8" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--arms", "all,nope"], "unknown arm 'nope'; the arms are all, badam, "),
    (["--arms", "quarter:5"], "write quarter:1 (bottom), quarter:2, quarter:3 or quarter:4 (top)"),
    (["--arms", "lisa:switch_interval=0"], "ISTConfig.switch_interval=0 is invalid"),
    (["--seeds", "1"], "--seeds='1': at least 2 seeds are needed"),
    (["--output_dir", "x"], "--output_dir: istune compare puts each run in"),
    (["--seed", "3"], "--seed: istune compare runs every arm at each of --seeds"),
    (["--data", "task:add:digits=0"], "digits='0' must be an integer from 2 to 12"),
])
def test_bad_input_is_refused_in_one_line_before_any_run(tiny_char_llama, tmp_path, capsys, extra, message):
    out = tmp_path / "compare"
    assert main(compare_args(tiny_char_llama, out, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (out / "runs").exists()
    if "unknown arm" in message:  # every rule, and the fixed-layer arms (other tests may have registered more rules)
        assert all(f" {name}" in error for name in ("fixed", "gradnorm", "ist", "lisa", "owlore", "probe-once",
                                                     "random"))
        assert "quarter:1 to quarter:4" in error and "layers:A-B" in error


def test_quarters_are_consecutive_and_spread_from_bottom_to_top():
    assert [quarter_layers(q, 30) for q in (1, 4)] == [list(range(0, 8)), list(range(22, 30))]
    assert [quarter_layers(q, 30)[0] for q in (2, 3)] == [7, 15]
    assert [quarter_layers(q, 4) for q in (1, 2, 3, 4)] == [[0], [1], [2], [3]]


def test_an_arm_sets_its_rule_and_takes_only_the_rule_parameters_its_rule_reads():
    base = ISTConfig(switch_interval=5, block_order="descending", strategy="badam", update_layers=3)
    arms = {arm.name: arm for arm in parse_arms("all,ist:probe_interval=2,badam,lisa:switch_interval=20,"
                                                "layers:2-4", num_layers=30)}
    configs = {name: arm_config(base, arm, seed=7) for name, arm in arms.items()}
    assert all(config.seed == 7 for config in configs.values())
    assert (configs["all"].strategy, configs["all"].switch_interval, configs["all"].update_layers) == ("all", 1, None)
    assert (configs["ist:probe_interval=2"].probe_interval, configs["ist:probe_interval=2"].switch_interval) == (2, 5)
    assert configs["ist:probe_interval=2"].block_order == "ascending"  # BAdam's alone
    assert (configs["badam"].block_order, configs["badam"].update_layers) == ("descending", 3)
    assert configs["lisa:switch_interval=20"].switch_interval == 20
    assert (configs["layers:2-4"].strategy, configs["layers:2-4"].layers) == ("fixed", [2, 3, 4])
    assert parse_seeds("3") == [1, 2, 3] and parse_seeds("4,2") == [2, 4]
    with pytest.raises(ValueError, match="the model has 30 layers"):
        parse_arms("layers:20-30", num_layers=30)
    assert compare_module.differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == ["a.b: 1 -> 2"]


def test_with_towers_select_quarters_are_refused_and_layers_checked_when_training_starts():
    with pytest.raises(ValueError, match=r"--arms: 'quarter:1' with --towers select: a quarter is N_L/4 "
                                         r"positions of the combined list .* give the positions as layers:A-B"):
        parse_arms("quarter:1", num_layers=None, towers="select")
    arms = parse_arms("ist,layers:30-33", num_layers=30, towers="select")  # N_L is towers' + language's
    assert arms[1].values == {"strategy": "fixed", "layers": [30, 31, 32, 33]}


COMPARE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "compare").glob("*.yaml"))


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=[path.stem for path in COMPARE_CONFIGS])
def test_the_gpu_plans_parse_with_their_arms_and_state_their_memory(path):
    text = path.read_text()
    assert text.splitlines()[0] == f"# istune compare --config configs/compare/{path.name}"
    assert "# Memory (`istune plan --model" in text and "# Time, an estimate, not measured" in text
    own, (arms, seeds, run, _, adapter, ist, training) = _parse_compare(["--config", str(path)])
    assert [arm.name for arm in arms] == ["all", "random", "ist"] and len(seeds) >= 2
    assert run.data == "commonsense" and run.curve_every > 0 and run.eval_method == "generate"
    assert (adapter.rank, ist.update_fraction) == (32, 0.25)
    assert own.out.startswith("runs/compare/")
    assert _parse_compare(["--config", str(path), "--seeds", "2"])[1][1] == [1, 2]  # a flag overrides the YAML


def test_the_learning_curve_does_not_change_the_training(tiny_char_llama, tmp_path):
    args = compare_args(tiny_char_llama, tmp_path)[7:]  # the `istune train` options of a comparison
    runs = {}
    for every in ("0", "1"):
        out = tmp_path / f"curve{every}"
        assert main(["train", *args, "--curve_every", every, "--output_dir", str(out), "--strategy", "ist",
                     "--update_layers", "1", "--probe_interval", "2"]) == 0
        runs[every] = (json.loads((out / "results.json").read_text()), _adapters(out))
    (without, weights), (with_curve, curve_weights) = runs["0"], runs["1"]
    assert without["curve"] is None and [p["step"] for p in with_curve["curve"]["points"]] == [0, 1, 2, 3, 4]
    assert all(torch.equal(weights[name], curve_weights[name]) for name in weights)
    assert with_curve["importance"] == without["importance"]
    assert with_curve["curve"]["points"][-1]["generate"] == with_curve["tuned"]["generate"]["average"]


def test_a_rule_parameter_flag_goes_to_the_arms_whose_rule_takes_it(tiny_char_llama, tmp_path):
    own, (arms, *_rest) = _parse_compare(["--arms", "all,badam,lisa:switch_interval=7,ist", "--block_order",
                                          "descending", "--switch_interval", "20", "--model", str(tiny_char_llama)])
    configs = {arm.name: arm_config(ISTConfig(), arm, seed=1) for arm in arms}
    assert (configs["badam"].block_order, configs["badam"].switch_interval) == ("descending", 20)
    assert configs["lisa:switch_interval=7"].switch_interval == 7  # the arm's own value wins
    assert (configs["ist"].switch_interval, configs["ist"].block_order) == (20, "ascending")
    assert (configs["all"].switch_interval, configs["all"].block_order) == (1, "ascending")
    config = tmp_path / "c.yaml"
    config.write_text("arms: [all, badam]\nseeds: [1, 2]\nblock_order: random\n")
    _, (arms, seeds, *_rest) = _parse_compare(["--config", str(config), "--model", str(tiny_char_llama)])
    assert [arm_config(ISTConfig(), arm, 1).block_order for arm in arms] == ["ascending", "random"] and seeds == [1, 2]


def test_an_option_added_since_a_run_was_saved_counts_as_its_default():
    """A comparison spans sessions and commits: a run saved before ISTConfig gained a field (``towers``) is still
    the same run when the field holds its default, and another when it does not."""
    from istune.recipe.compare import differences

    now = ISTConfig(strategy="random").to_dict()
    saved = {name: value for name, value in now.items() if name != "towers"}
    assert differences({"ist": saved}, {"ist": now}) == []
    assert differences({"ist": {**saved, "mu": 5.0}}, {"ist": now}) == ["ist.mu: 5.0 -> 10.0"]
    other = ISTConfig(strategy="random", towers="select").to_dict()
    assert differences({"ist": saved}, {"ist": other}) == ["ist.towers: 'train' -> 'select'"]
