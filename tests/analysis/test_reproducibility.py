"""istune analyze reproducibility: agreement across seeds, its permutation baseline, trajectories, resumable runs."""

from __future__ import annotations

import json
import random

import pytest

from istune.analysis import cli, reproducibility
from istune.analysis.reproducibility import Group


def test_agreement_of_identical_and_reversed_rankings():
    a = [0.1, 0.5, -0.2, 0.9, 0.0]
    assert reproducibility.pairwise_agreement([a, list(a), list(a)], k=2) == (pytest.approx(1.0), 1.0)
    reversed_a = [-v for v in a]
    rho, overlap = reproducibility.pairwise_agreement([a, reversed_a], k=2)
    assert rho == pytest.approx(-1.0)
    assert overlap == 0.0  # top-2 of a: positions 3, 1; of -a: positions 2, 4


def test_permutation_baseline_matches_chance():
    rng = random.Random(0)
    vectors = [[rng.random() for _ in range(30)] for _ in range(3)]
    baseline = reproducibility.permutation_baseline(vectors, k=8, permutations=800)
    assert abs(baseline["spearman_mean"]) < 0.03  # random rankings: E[rho] = 0
    assert baseline["overlap_mean"] == pytest.approx(8 / 30, abs=0.02)  # hypergeometric mean k/N_L
    # The 95th percentile of the mean of 3 pairwise rhos, each with sd 1/sqrt(29): about 1.645 * 0.186 / sqrt(3).
    assert 0.1 < baseline["spearman_95"] < 0.3


def test_reproducible_from_is_the_start_of_the_last_run_above_the_baseline():
    def rows(values):
        return [{"updates": 10 * (i + 1), "spearman": v, "baseline_spearman_95": 0.2} for i, v in enumerate(values)]

    assert reproducibility.reproducible_from(rows([0.1, 0.3, 0.1, 0.4, 0.5])) == 40
    assert reproducibility.reproducible_from(rows([0.3, 0.5, 0.6])) == 10
    assert reproducibility.reproducible_from(rows([0.3, 0.5, 0.1])) is None
    assert reproducibility.reproducible_from(rows([None, 0.5])) == 20


def _trajectories(seeds, updates, signal, num_layers=12):
    """Importance = a shared ranking times ``signal * u`` plus independent noise per seed."""
    truth = list(range(num_layers))
    result = []
    for seed in seeds:
        rng = random.Random(seed)
        result.append([[signal * u * t + rng.gauss(0, 1) for t in truth] for u in range(1, updates + 1)])
    return result


def test_a_shared_signal_becomes_reproducible_and_noise_does_not():
    signal = reproducibility.study([Group("signal", _trajectories([1, 2, 3], 40, signal=0.05))], k=3, every=10,
                                   permutations=300)["groups"][0]
    assert signal["reproducible_from"] is not None and signal["reproducible_from"] <= 20
    assert signal["rows"][-1]["spearman"] > 0.8
    noise = reproducibility.study([Group("noise", _trajectories([1, 2, 3], 40, signal=0.0))], k=3, every=10,
                                  permutations=300)["groups"][0]
    assert all(row["spearman"] < 0.6 for row in noise["rows"])
    assert [row["updates"] for row in noise["rows"]] == [1, 10, 20, 30, 40]


def test_one_seed_is_refused():
    with pytest.raises(ValueError, match="at least two seeds"):
        reproducibility.agreement_curve(Group("mu=10", _trajectories([1], 5, 0.1)), k=2)


def test_log_trajectory_reads_each_update_and_refuses_logs_without_one(tmp_path):
    events = [{"event": "select", "step": 1, "selected": [0]},
              {"event": "probe", "step": 10, "importance": [0.1, 0.0]},
              {"event": "probe", "step": 20, "importance": [0.1, 0.0], "skipped": True},
              {"event": "probe", "step": 30, "importance": [0.3, -0.2]}]
    (tmp_path / "ist_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert reproducibility.log_trajectory(tmp_path) == [[0.1, 0.0], [0.1, 0.0], [0.3, -0.2]]
    (tmp_path / "ist_log.jsonl").write_text(json.dumps(events[0]) + "\n")
    with pytest.raises(ValueError, match="no importance update"):
        reproducibility.log_trajectory(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        reproducibility.log_trajectory(tmp_path / "missing")


@pytest.mark.parametrize("text", ["runs/a,runs/b", "mu=10:runs/a", ":runs/a,runs/b", ";"])
def test_bad_log_groups_are_refused_with_the_form_to_use(text):
    with pytest.raises(ValueError, match="--logs"):
        reproducibility.parse_log_groups(text)


def test_frozen_runs_are_saved_and_resumed_and_the_report_written(lora_run, tmp_path, monkeypatch, capsys):
    argv = ["reproducibility", "--run", str(lora_run), "--configs", "mu=10;reward_scale=spread,mu=0.5",
            "--seeds", "1,2", "--updates", "3", "--every", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    saved = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert saved == ["mu_10_seed1.json", "mu_10_seed2.json", "reward_scale_spread_mu_0.5_seed1.json",
                     "reward_scale_spread_mu_0.5_seed2.json"]
    first = json.loads((tmp_path / "runs" / "mu_10_seed1.json").read_text())
    assert len(first["trajectory"]) == 3 and len(first["trajectory"][0]) == 4
    result = json.loads((tmp_path / "reproducibility.json").read_text())
    assert [g["label"] for g in result["groups"]] == ["mu=10", "reward_scale=spread,mu=0.5"]
    assert [row["updates"] for row in result["groups"][0]["rows"]] == [1, 2, 3]
    assert (tmp_path / "reproducibility.png").stat().st_size > 0

    # A second call loads every saved run instead of probing again.
    import istune.bench.probes as probes

    monkeypatch.setattr(probes, "importance_run", lambda *a, **k: pytest.fail("a saved run was run again"))
    assert cli.main(argv) == 0
    assert "loaded" in capsys.readouterr().out
    # The same file under other settings is refused, not mixed in.
    with pytest.raises(ValueError, match="other settings"):
        cli.main([*argv[:-4], "--updates", "4", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv,words", [
    (["reproducibility"], "either --run"),
    (["reproducibility", "--run", "x", "--logs", "a:b,c"], "either --run"),
    (["reproducibility", "--run", "x", "--seeds", "1"], "at least two seeds"),
    (["reproducibility", "--run", "x", "--configs", "mu=0"], "ISTConfig.mu=0"),
    (["reproducibility", "--run", "x", "--updates", "0"], "--updates"),
])
def test_bad_options_are_refused_before_any_work(argv, words):
    with pytest.raises(ValueError, match=words):
        cli.main(argv)
