"""`istune eval --model/--adapter`: any model or adapter folder; the untuned model's results from the cache;
bad paths refused before the model loads."""

import json

import pytest

from istune.cli import _parse_eval, main
from istune.recipe import evaluate as recipe_evaluate

from ..eval.conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    make_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def eval_args(model_dir, out, *extra):
    return ["eval", "--model", str(model_dir), "--eval_tasks", "piqa,boolq", "--eval_limit", "2",
            "--eval_batch_size", "2", "--output", str(out), *extra]


def test_bare_model_then_cache(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(eval_args(model_dir, out)) == 0
    first = json.loads(out.read_text())
    assert first["eval_tasks"] == ["boolq", "piqa"] or first["eval_tasks"] == ["piqa", "boolq"]
    for method in ("generate", "score"):
        assert {t: s["total"] for t, s in first[method]["tasks"].items()} == {"piqa": 2, "boolq": 2}
    assert first["cache"]["hits"] == 0 and first["cache"]["misses"] == 4
    assert "score/char" in capsys.readouterr().out

    assert main(eval_args(model_dir, out)) == 0  # the same model, items and methods: nothing recomputed
    second = json.loads(out.read_text())
    assert second["cache"]["hits"] == 4 and second["cache"]["misses"] == 0
    assert {m: second[m] for m in ("generate", "score")} == {m: first[m] for m in ("generate", "score")}

    assert main(eval_args(model_dir, out, "--no_cache")) == 0
    assert "cache" not in json.loads(out.read_text())


def test_generation_batch_size_changes_the_batching_not_the_answers(model_dir, tmp_path):
    responses = []
    for size in ("1", "3"):
        out = tmp_path / f"eval{size}.json"
        assert main(eval_args(model_dir, out, "--eval_limit", "3", "--eval_method", "generate", "--no_cache",
                              "--generation_batch_size", size)) == 0
        responses.append(json.loads(out.read_text())["generate"])
    assert responses[0] == responses[1]


def test_peft_and_istune_adapter_folders(model_dir, tmp_path):
    import peft

    from istune.adapters.methods import AdapterArgs, add_adapters, save_adapters

    tokenizer = make_tokenizer()
    lora = peft.get_peft_model(make_model("llama", len(tokenizer)), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "peft")
    series = add_adapters(make_model("llama", len(tokenizer)), AdapterArgs(method="series", bottleneck_size=4), 1)
    save_adapters(series, tmp_path / "run" / "adapter", AdapterArgs(method="series", bottleneck_size=4))
    base_out, peft_out, series_out = tmp_path / "base.json", tmp_path / "peft.json", tmp_path / "series.json"
    assert main(eval_args(model_dir, base_out, "--eval_method", "score")) == 0
    assert main(eval_args(model_dir, peft_out, "--eval_method", "score", "--adapter", str(tmp_path / "peft"))) == 0
    # a run folder holding adapter/ is accepted too
    assert main(eval_args(model_dir, series_out, "--eval_method", "score", "--adapter", str(tmp_path / "run"))) == 0
    base, with_peft, with_series = (json.loads(p.read_text()) for p in (base_out, peft_out, series_out))
    assert with_peft["adapter"] == str(tmp_path / "peft") and "cache" not in with_peft
    assert with_series["adapter"] == str(tmp_path / "run" / "adapter")
    assert with_peft["score"]["tasks"]["piqa"]["total"] == 2
    assert base["score"]["tasks"]["boolq"]["total"] == with_series["score"]["tasks"]["boolq"]["total"] == 2
    found = recipe_evaluate.find_adapter(str(tmp_path / "peft"))
    assert (found.kind, found.base_model) == ("peft", lora.peft_config["default"].base_model_name_or_path)
    assert recipe_evaluate.find_adapter(str(tmp_path / "run")).kind == "istune"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "./no/such/model"], "--model='./no/such/model': no such folder"),
        (["--adapter", "/no/such/adapter"], "--adapter='/no/such/adapter': no such folder"),
        (["--eval_limit", "0"], "--eval_limit=0"),
        (["--eval_tasks", "mmlu"], "--eval_tasks='mmlu'"),
        (["--eval_batch_size", "0"], "--eval_batch_size=0"),
        (["--generation_batch_size", "0"], "--generation_batch_size=0 must be at least 1"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch, extra, message):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("istune.models.load_model_and_tokenizer", never)
    out = tmp_path / "eval.json"
    assert main(eval_args(model_dir, out) + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_adapter_folder_and_output(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(eval_args(model_dir, tmp_path / "x.json", "--adapter", str(empty))) == 2
    assert "holds neither istune_method.json (istune) nor adapter_config.json (peft)" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "istune_method.json").write_text(json.dumps({"method": "lora"}))
    assert main(eval_args(model_dir, tmp_path / "x.json", "--adapter", str(broken))) == 2
    assert "lora adapters need ['adapter_config.json']" in capsys.readouterr().err
    assert main(eval_args(model_dir, tmp_path)) == 2  # --output is a folder
    assert "is a folder" in capsys.readouterr().err


def test_run_folder_and_model_are_exclusive(model_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--model", str(model_dir)])
    with pytest.raises(SystemExit):
        main(["eval"])


@pytest.mark.parametrize(
    "argv,run_dir,options",
    [
        (["runs/x"], "runs/x", {"eval_tasks": None, "eval_method": None, "harness": False, "cache": True}),
        (["--harness", "runs/x", "--eval_limit", "3"], "runs/x", {"harness": True, "eval_limit": 3}),
        (["runs/x", "--harness"], "runs/x", {"harness": True}),
        (["--model", "m", "--no_cache", "--harness", "false", "--eval_method=score"], None,
         {"model": "m", "cache": False, "harness": False, "eval_method": "score"}),
    ],
)
def test_options_come_from_eval_args(argv, run_dir, options):
    got_run_dir, args = _parse_eval(argv)
    assert got_run_dir == run_dir
    assert {name: getattr(args, name) for name in options} == options
    assert args.with_model_defaults().eval_tasks == "all"  # unset: the run's, or with --model all


def test_yaml_config_gives_defaults_and_refuses_unknown_keys(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("model: m\neval_limit: 3\nharness: true\n")
    run_dir, args = _parse_eval(["--config", str(config), "--eval_limit", "5"])
    assert (run_dir, args.model, args.eval_limit, args.harness) == (None, "m", 5, True)
    config.write_text("model: m\neval_limt: 3\n")
    assert main(["eval", "--config", str(config)]) == 2
    assert "unknown option 'eval_limt'; did you mean 'eval_limit'?" in capsys.readouterr().err


def test_format_comparison_lines_up_lm_eval_beside_istune():
    results = {"eval_tasks": ["piqa"],
               "score": {"tasks": {"piqa": {"accuracy": 0.5, "accuracy_per_char": 0.25, "total": 4}}},
               "harness": {"tasks": {"piqa": {"acc": 0.75, "acc_norm": None, "total": 4}}}}
    table = recipe_evaluate.format_comparison(results)
    row = table.splitlines()[2].split()
    assert row == ["piqa", "4", "50.0", "25.0", "75.0", "-"]
