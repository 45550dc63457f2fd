"""benchmarks/accuracy_compare.py: the report from saved runs, checked against numbers worked out by hand;
the arms trained on a tiny random LLaMA (importance updates made, IST logs kept, resumption)."""

import json
import math
import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from istune.analysis import cli as analysis_cli
from istune.analysis.reproducibility import log_trajectory, parse_log_groups
from istune.bench.stats import seeds_for_power
from istune.eval.answers import extract_answer, is_correct
from tests.bench import load_benchmark_script
from tests.eval.conftest import make_tokenizer


@pytest.fixture(scope="module")
def accuracy_compare():
    return load_benchmark_script("accuracy_compare")


def _save_run(out, strategy, seed, final_loss, score, generate):
    run = {"strategy": strategy, "seed": seed, "train_seconds": 10.0 * seed,
           "curve": [[0, 2.0], [3, 2 * final_loss], [6, final_loss]],
           "accuracy": {"score": {"boolq": score[:2], "piqa": score[2:]},
                        "generate": {"boolq": generate[:2], "piqa": generate[2:]}}}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{strategy}-seed{seed}.json").write_text(json.dumps(run))


def _row(table, first_cell):
    line = next(line for line in table.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_means_and_paired_differences(accuracy_compare, tmp_path):
    T, F = True, False
    _save_run(tmp_path, "all", 1, 0.20, [T, F, T, F], [T, T, F, F])
    _save_run(tmp_path, "all", 2, 0.22, [T, F, F, F], [T, T, F, F])
    _save_run(tmp_path, "ist", 1, 0.18, [T, T, T, F], [T, T, F, F])
    _save_run(tmp_path, "ist", 2, 0.19, [T, F, T, F], [T, F, F, F])

    table = accuracy_compare.report(tmp_path)

    ist = _row(table, "ist")
    assert ist[1] == "2"
    half = 12.706 * math.sqrt(((0.18 - 0.185) ** 2 + (0.19 - 0.185) ** 2) / 1) / math.sqrt(2)
    assert ist[2] == f"0.1850 ± {half:.4f}"
    assert ist[3].startswith("62.5 ± ")  # (75 + 50) / 2
    assert ist[5] == "15"  # mean train seconds
    # Paired, per item averaged over the two seeds: score (0, 50, 50, 0), generation (0, -50, 0, 0).
    diff = _row(table, "ist − all")
    assert diff[1] == "2"
    assert diff[2].startswith("-0.0250 ± ")
    assert diff[3].startswith("-0.0375 ± ")  # steps 3 and 6 lie in the last two thirds: mean 1.5 x final
    score_half = 3.182 * math.sqrt(sum((d - 25) ** 2 for d in (0, 50, 50, 0)) / 3) / 2
    assert diff[4] == f"+25.0 ± {score_half:.1f}"
    assert diff[5].startswith("-12.5 ± ")
    assert "| random |" not in table  # no runs saved for it
    # Seed spread: per-seed differences over all items (score 75-50, 50-25; generation 50-50, 25-50).
    score = [cell.strip() for cell in table.split("| ist − all | score |")[1].split("\n")[0].strip(" |").split("|")]
    assert score == ["+25.00, +25.00", "0.00", "25%", "2"]  # same difference at both seeds: s = 0
    generate = [cell.strip()
                for cell in table.split("| ist − all | generate |")[1].split("\n")[0].strip(" |").split("|")]
    assert generate[:2] == ["+0.00, -25.00", f"{statistics.stdev([0, -25]):.2f}"]
    assert int(generate[3]) == seeds_for_power(statistics.stdev([0, -25]), 1.8)
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_report_only_writes_results_without_training(accuracy_compare, tmp_path):
    _save_run(tmp_path, "all", 1, 0.2, [True] * 4, [False] * 4)
    accuracy_compare.main(["--out", str(tmp_path), "--report_only"])
    text = (tmp_path / "results.md").read_text()
    assert "--report_only" in text and "| all | 1 | 0.2000 ± nan |" in text


def test_report_compares_means_over_the_seeds_every_strategy_has(accuracy_compare, tmp_path):
    _save_run(tmp_path, "all", 1, 0.2, [True] * 4, [False] * 4)
    _save_run(tmp_path, "all", 2, 0.4, [True] * 4, [False] * 4)
    _save_run(tmp_path, "ist", 1, 0.1, [True] * 4, [False] * 4)

    table = accuracy_compare.report(tmp_path)

    assert table.startswith("Means over seed 1 ± 95% CI; runs without every arm left out: all-seed2.")
    assert _row(table, "all")[1:3] == ["1", "0.2000 ± nan"]


def test_per_task_table_puts_the_base_model_beside_the_strategies(accuracy_compare, tmp_path):
    T, F = True, False
    _save_run(tmp_path, "all", 1, 0.2, [T, F, T, T], [F, F, T, F])
    _save_run(tmp_path, "all", 2, 0.2, [T, T, T, T], [F, F, F, F])
    (tmp_path / "base.json").write_text(json.dumps({"accuracy": {"score": {"boolq": [F, F], "piqa": [T, F]}}}))

    table = accuracy_compare.report(tmp_path)

    assert "| task | base (option scoring) | all (option scoring) | all (generation) |" in table
    assert _row(table, "boolq")[1:] == ["0.0", "75.0", "0.0"]
    assert _row(table, "piqa")[1:] == ["50.0", "100.0", "25.0"]
    assert _row(table, "average")[1:] == ["25.0", "87.5", "12.5"]


@pytest.mark.parametrize("options, message", [
    (["--arms", "ist,misa"],
     "--arms='ist,misa': unknown 'misa'; use a comma-separated list of all, random, ist, ist-tc2, ist-spread"),
    (["--strategies", "ist,misa"], "--strategies='ist,misa': unknown 'misa'"),
    (["--arms", "ist", "--strategies", "ist"], "--strategies is the old name of --arms; give only --arms"),
    (["--seeds", "1,two"], "'two' is not an int"),
    (["--seeds", "1,1"], "--seeds='1,1' repeats a value"),
    (["--eval_limit", "0"], "--eval_limit=0 must be at least 1"),
    (["--spread_mu", "0"], "--spread_mu=0.0 must be a finite number above 0"),
    (["--tasks", "boolq,mmlu"], "--tasks='boolq,mmlu': unknown 'mmlu'"),
])
def test_bad_options_are_refused_before_any_work(accuracy_compare, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        accuracy_compare.main(["--out", str(tmp_path / "out"), *options])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_base_model_scored_on_other_items_is_refused(accuracy_compare, tmp_path):
    _save_run(tmp_path, "all", 1, 0.2, [True] * 4, [False] * 4)
    (tmp_path / "base.json").write_text(json.dumps({"accuracy": {"score": {"boolq": [True] * 3, "piqa": [True] * 2}}}))
    with pytest.raises(ValueError, match="other items"):
        accuracy_compare.report(tmp_path)


def test_report_without_saved_runs_says_what_to_do(accuracy_compare, tmp_path):
    with pytest.raises(FileNotFoundError, match="without --report_only first"):
        accuracy_compare.report(tmp_path)


def test_report_pairs_every_arm_present_and_reads_runs_saved_before_arms(accuracy_compare, tmp_path):
    T, F = True, False
    for seed in (1, 2):
        _save_run(tmp_path, "all", seed, 0.20, [T, F, T, F], [T, T, F, F])  # the old format: "strategy" only
        for arm, loss in (("ist-tc2", 0.17), ("ist-spread", 0.16)):
            _save_run(tmp_path, arm, seed, loss, [T, T, T, F], [T, T, F, F])
            run = json.loads((tmp_path / "runs" / f"{arm}-seed{seed}.json").read_text())
            run.update(arm=arm, strategy="ist", importance_updates=150 + seed,
                       ist_config={"strategy": "ist", "probe_interval": 2, "mu": 0.1 if arm == "ist-spread" else 10.0,
                                   "reward_scale": "spread" if arm == "ist-spread" else "paper"})
            (tmp_path / "runs" / f"{arm}-seed{seed}.json").write_text(json.dumps(run))

    table = accuracy_compare.report(tmp_path)

    paired = table.split("Seed spread")[0]  # the paired-differences table, not the seed-spread one after it
    comparisons = [line.split("|")[1].strip() for line in paired.splitlines() if " − " in line]
    assert comparisons == ["ist-tc2 − all", "ist-spread − ist-tc2"]  # only the pairs whose arms both ran
    assert _row(table, "ist-tc2 − all")[2].startswith("-0.0300 ± ")
    assert _row(table, "ist-spread − ist-tc2")[2].startswith("-0.0100 ± ")
    assert _row(table, "ist-tc2")[6] == "151, 152" and _row(table, "all")[6] == "n/a"
    assert "- `ist-spread`: LoRA + IST, T_c = 2, spread-scaled rewards (T_c = 2, μ = 0.1, rewards: spread)" in table


def test_report_pairs_each_rule_with_random_and_all_and_names_its_settings(accuracy_compare, tmp_path):
    T, F = True, False
    opts = accuracy_compare._parser().parse_args([])
    for seed in (1, 2):
        _save_run(tmp_path, "all", seed, 0.20, [T, F, T, F], [T, T, F, F])
        _save_run(tmp_path, "random", seed, 0.21, [T, F, T, F], [T, T, F, F])
        _save_run(tmp_path, "badam", seed, 0.19 + seed / 100, [T, T, T, F], [T, T, F, F])
        run = json.loads((tmp_path / "runs" / f"badam-seed{seed}.json").read_text())
        config = accuracy_compare.arm_config("badam", seed, opts).to_dict()
        run.update(arm="badam", strategy="badam", ist_config=config)
        (tmp_path / "runs" / f"badam-seed{seed}.json").write_text(json.dumps(run))

    table = accuracy_compare.report(tmp_path)

    paired = table.split("Seed spread")[0]
    comparisons = [line.split("|")[1].strip() for line in paired.splitlines() if " − " in line]
    assert comparisons == ["random − all", "badam − random", "badam − all"]
    assert _row(table, "badam − random")[2].startswith("-0.0050 ± ")  # (0.20 - 0.21 + 0.21 - 0.21) / 2
    assert _row(table, "badam − all")[4].startswith("+25.0 ± ")  # one more item right of four, both seeds
    assert "- `badam`: LoRA + BAdam's order: blocks of N_u consecutive layers, ascending (Luo et al. 2024) " \
           "(K = 25, block_order = ascending)" in table


def test_runs_saved_before_istconfig_gained_fields_are_still_resumed(accuracy_compare, tmp_path, capsys):
    """accuracy-updates' runs were saved before stored_layers and the rules' parameters existed: the same command
    must still accept them (the new fields hold their defaults), and refuse a run whose new field differs."""
    opts = accuracy_compare._parser().parse_args(["--out", str(tmp_path)])
    saved = accuracy_compare.arm_config("random", 1, opts).to_dict()
    for name in ("stored_layers", "switch_interval", "block_order", "outlier_threshold", "calibration_interval",
                 "exploration", "gradnorm_decay", "probe_by"):
        del saved[name]
    _save_run(tmp_path, "random", 1, 0.2, [True] * 4, [False] * 4)
    run = json.loads((tmp_path / "runs" / "random-seed1.json").read_text())
    run.update(arm="random", ist_config=saved, options={"max_steps": 300})
    (tmp_path / "runs" / "random-seed1.json").write_text(json.dumps(run))
    accuracy_compare.check_saved(tmp_path, ["random"], [1], opts)  # accepted

    run["ist_config"] = {**saved, "switch_interval": 5}
    (tmp_path / "runs" / "random-seed1.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="random-seed1.json was made with another ISTConfig"):
        accuracy_compare.check_saved(tmp_path, ["random"], [1], opts)


# ---- training the arms on a tiny model ----------------------------------------------------------

TINY = ["--tasks", "boolq", "--eval_limit", "2", "--heldout", "4", "--batch_size", "2", "--rank", "2",
        "--cutoff_len", "48", "--curve_every", "5", "--max_steps", "10"]


@pytest.fixture
def tiny_study(accuracy_compare, monkeypatch):
    """The script on a 4-layer random LLaMA and 40 short training rows; returns the (arm, seed) runs trained."""
    tokenizer = make_tokenizer()

    def load(name):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3)
        return LlamaForCausalLM(config), tokenizer

    def rows(run, seed):
        made = [{"instruction": f"question {i % 7} ?", "input": "",
                 "output": f"the answer is {'true' if i % 2 else 'false'}",
                 "answer": "true" if i % 2 else "false"} for i in range(40)]
        return made[run.heldout_samples:run.heldout_samples + run.train_samples], made[:run.heldout_samples]

    trained = []
    original = accuracy_compare.run_one

    def run_one(arm, seed, opts, folder):
        trained.append((arm, seed))
        return original(arm, seed, opts, folder)

    monkeypatch.setattr(accuracy_compare, "load_model_and_tokenizer", load)
    monkeypatch.setattr(accuracy_compare, "load_rows", rows)
    monkeypatch.setattr(accuracy_compare, "run_one", run_one)
    return trained


def test_arms_make_their_importance_updates_keep_their_logs_and_resume(accuracy_compare, tiny_study, tmp_path):
    out = tmp_path / "study"
    options = ["--out", str(out), "--arms", "ist,ist-tc2", "--seeds", "1,2", *TINY]

    accuracy_compare.main(options)

    assert tiny_study == [("ist", 1), ("ist-tc2", 1), ("ist", 2), ("ist-tc2", 2)]  # seed by seed
    runs = {(a, k): json.loads((out / "runs" / f"{a}-seed{k}.json").read_text()) for a, k in tiny_study}
    for seed in (1, 2):
        assert runs[("ist", seed)]["importance_updates"] == 10 // 10  # T_c = 10
        assert runs[("ist-tc2", seed)]["importance_updates"] == 10 // 2  # T_c = 2
        assert runs[("ist-tc2", seed)]["ist_config"]["probe_interval"] == 2
        assert runs[("ist-tc2", seed)]["batch_layout"] == {"padding_free": True, "labelled_logits_only": True}
        assert [step for step, _ in runs[("ist", seed)]["curve"]] == [0, 5, 10]
    # Each run's IST log stays in its folder, in the form `istune analyze reproducibility --logs` reads.
    folders = f"{out}/runs/ist-tc2-seed1,{out}/runs/ist-tc2-seed2"
    [(label, paths)] = parse_log_groups(f"ist-tc2:{folders}")
    trajectories = [log_trajectory(path) for path in paths]
    assert label == "ist-tc2" and [len(t) for t in trajectories] == [5, 5]
    assert trajectories[0][-1] == pytest.approx(runs[("ist-tc2", 1)]["importance"])
    analysis_cli.main(["reproducibility", "--logs", f"ist-tc2:{folders}", "--every", "1",
                       "--out", str(tmp_path / "repro")])
    study = json.loads((tmp_path / "repro" / "reproducibility.json").read_text())
    assert [row["updates"] for row in study["groups"][0]["rows"]] == [1, 2, 3, 4, 5]
    results = (out / "results.md").read_text()
    assert "| ist-tc2 − ist | 2 |" in results and "− random" not in results  # pairs of the arms present only

    tiny_study.clear()
    accuracy_compare.main(options)  # everything saved: nothing trains again
    assert tiny_study == []


def test_a_saved_run_made_with_other_options_is_refused(accuracy_compare, tmp_path, capsys):
    _save_run(tmp_path, "ist-tc2", 1, 0.2, [True] * 4, [False] * 4)
    run = json.loads((tmp_path / "runs" / "ist-tc2-seed1.json").read_text())
    run["options"] = {"max_steps": 150}
    (tmp_path / "runs" / "ist-tc2-seed1.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit):
        accuracy_compare.main(["--out", str(tmp_path), "--arms", "ist-tc2", "--seeds", "1"])
    assert "ist-tc2-seed1.json was made with --max_steps=150, this call has --max_steps=300" in capsys.readouterr().err
    assert not (tmp_path / "base.json").exists()


def test_train_only_keeps_the_ist_log_and_skips_curve_evaluation_and_report(accuracy_compare, tiny_study, tmp_path):
    out = tmp_path / "study"

    accuracy_compare.main(["--out", str(out), "--arms", "ist-tc2-mu100", "--seeds", "1", "--train_only", *TINY])

    run = json.loads((out / "runs" / "ist-tc2-mu100-seed1.json").read_text())
    assert run["train_only"] and run["importance_updates"] == 10 // 2
    assert run["ist_config"]["mu"] == 100.0 and run["ist_config"]["probe_interval"] == 2
    assert "curve" not in run and "accuracy" not in run
    assert log_trajectory(out / "runs" / "ist-tc2-mu100-seed1")[-1] == pytest.approx(run["importance"])
    assert not (out / "results.md").exists() and not (out / "base.json").exists()
    # A report over the folder leaves train-only runs out rather than failing on their missing accuracy.
    _save_run(out, "all", 1, 0.2, [True] * 4, [False] * 4)
    table = accuracy_compare.report(out)
    assert "ist-tc2-mu100" not in table and _row(table, "all")[1] == "1"


def test_train_only_with_report_only_is_refused(accuracy_compare, tmp_path, capsys):
    with pytest.raises(SystemExit):
        accuracy_compare.main(["--out", str(tmp_path / "out"), "--train_only", "--report_only"])
    assert "--train_only and --report_only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_train_only_run_is_not_reused_by_a_full_run(accuracy_compare, tmp_path, capsys):
    _save_run(tmp_path, "ist-tc2", 1, 0.2, [True] * 4, [False] * 4)
    run = json.loads((tmp_path / "runs" / "ist-tc2-seed1.json").read_text())
    run["train_only"] = True
    (tmp_path / "runs" / "ist-tc2-seed1.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit):
        accuracy_compare.main(["--out", str(tmp_path), "--arms", "ist-tc2", "--seeds", "1"])
    assert "ist-tc2-seed1.json was made with --train_only, this call is without it" in capsys.readouterr().err
    assert not (tmp_path / "base.json").exists()


@pytest.mark.parametrize("arm", ["lisa", "badam", "owlore", "gradnorm", "probe-once"])
def test_each_rule_arm_trains_with_its_settings_and_keeps_its_selections(accuracy_compare, tiny_study, tmp_path, arm):
    """A smoke run of each peer rule's arm: 4 steps on the tiny LLaMA (N_L = 4, N_u = 1), evaluated and reported."""
    out = tmp_path / "study"
    options = ["--out", str(out), "--arms", arm, "--seeds", "1", *TINY]
    options[options.index("--max_steps") + 1], options[options.index("--curve_every") + 1] = "4", "4"

    accuracy_compare.main(options)

    run = json.loads((out / "runs" / f"{arm}-seed1.json").read_text())
    expected = accuracy_compare.arm_config(arm, 1, accuracy_compare._parser().parse_args(options))
    assert run["arm"] == arm and run["strategy"] == arm and run["ist_config"] == expected.to_dict()
    assert [step for step, _ in run["curve"]] == [0, 4] and run["importance_updates"] == 0
    assert {len(run["accuracy"][m]["boolq"]) for m in ("score", "generate")} == {2}
    generated = run["generated"]  # the text behind each generation verdict, and the answer word found in it
    assert [len(generated[key]["boolq"]) for key in ("response", "prediction")] == [2, 2]
    assert all(isinstance(response, str) for response in generated["response"]["boolq"])
    items = accuracy_compare.load_eval_items(["boolq"], 2, accuracy_compare.EVAL_SEED)["boolq"]
    for item, response, prediction, correct in zip(items, generated["response"]["boolq"],
                                                   generated["prediction"]["boolq"],
                                                   run["accuracy"]["generate"]["boolq"]):
        assert prediction == extract_answer("boolq", response)
        assert correct == is_correct("boolq", prediction, item["answer"])
    events = [json.loads(line) for line in (out / "runs" / f"{arm}-seed1" / "ist_log.jsonl").read_text().splitlines()]
    selections = [event["selected"] for event in events if event["event"] == "select"]
    assert len(selections) == 4 and all(len(s) == 1 for s in selections)  # N_u = 25% of 4 layers
    if arm == "badam":
        assert selections == [[0]] * 4  # ascending: the bottom block for the first K = 25 steps
    elif arm != "gradnorm":  # K = 20 or 25 > 4 steps, or fixed after the probe: one selection held
        assert all(s == selections[0] for s in selections)
    measured = [(event["step"], event["what"]) for event in events if event["event"] == "measure"]
    # one measurement, before the first step (logged as step 1, as its selection)
    assert [step for step, _ in measured] == ([] if arm in ("lisa", "badam") else [1])
    assert f"| {arm} | 1 |" in (out / "results.md").read_text()
