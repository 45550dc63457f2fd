"""The report of an `istune compare` folder, from saved runs written here by hand: every number against a
reference computed another way."""

import json
import math
import statistics

import numpy as np
import pytest

from istune.analysis.comparison import area_under_curve, build_report, steps_to_reach, write_report
from istune.bench.probes import spearman
from istune.runs import COMPARE_FILE, comparison_run_folder, quarter_layers

N_LAYERS = 8  # quarters of 2 layers: 0-1, 2-3, 4-5, 6-7


def _save_run(out, arm, seed, accuracy, *, layers=None, selections=(), importance=(), seconds=10.0):
    folder = comparison_run_folder(out, arm, seed)
    folder.mkdir(parents=True)
    steps = [10 * i for i in range(len(accuracy))]
    results = {"curve": {"points": [{"step": s, "generate": a} for s, a in zip(steps, accuracy)], "seconds": 4.0,
                         "final_step": steps[-1]},
               "train_seconds": seconds + 4.0, "importance": [0.0] * N_LAYERS, "ist": {"layers": layers},
               "tuned": {"heldout_loss": 1.0, "generate": {"average": accuracy[-1]}}}
    (folder / "results.json").write_text(json.dumps(results))
    events = [{"event": "select", "step": i + 1, "selected": list(chosen)} for i, chosen in enumerate(selections)]
    events += [{"event": "probe", "step": step, "importance": list(values)} for step, values in importance]
    (folder / "ist_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "compare"
    arms = ["all", "random", "ist"] + [f"quarter:{q}" for q in range(1, 5)]
    out.mkdir()
    (out / COMPARE_FILE).write_text(json.dumps({"settings": {}, "arms": arms, "seeds": [1, 2, 3]}))
    curves = {"all": [[0, .5, .8], [0, .4, .9], [.1, .6, .7]], "random": [[0, .2, .5], [0, .3, .4], [0, .1, .6]],
              "ist": [[0, .3, .6], [0, .2, .7], [0, .45, .5]]}
    for arm, per_seed in curves.items():
        for seed, accuracy in enumerate(per_seed, 1):
            selections = [[6, 7], [6, 5], [0, 7]] if arm == "ist" else [[i, i + 1] for i in (0, 2, 4)]
            importance = [(10, [0, 0, 0, 0, 1, 1, 0, 0]), (20, [0, 0, 0, 0, 0, 0, 2, 3])] if arm == "ist" else []
            _save_run(out, arm, seed, accuracy, selections=selections, importance=importance, seconds=20.0)
    for q, final in zip(range(1, 5), (0.1, 0.3, 0.5, 0.9)):
        for seed in (1, 2):
            _save_run(out, f"quarter:{q}", seed, [0, final / 2, final], layers=quarter_layers(q, N_LAYERS))
    return out


def test_curve_measures_against_numpy():
    steps, accuracy = [0, 10, 30, 60], [0.0, 0.2, 0.5, 0.9]
    assert area_under_curve(steps, accuracy) == pytest.approx(np.trapezoid(accuracy, steps) / 60)
    assert steps_to_reach(steps, accuracy, 0.5) == 30 and steps_to_reach(steps, accuracy, 0.95) is None


def test_report_numbers_against_the_runs(folder):
    report = build_report(folder, effect=0.1)
    ist = report["arms"]["ist"]
    assert ist["final"][0] == pytest.approx(0.6)
    assert ist["final"][1] == pytest.approx(4.303 * statistics.stdev([.6, .7, .5]) / math.sqrt(3))
    assert ist["auc"][0] == pytest.approx(statistics.fmean(np.trapezoid(c, [0, 10, 20]) / 20
                                                           for c in ([0, .3, .6], [0, .2, .7], [0, .45, .5])))
    assert ist["seconds_per_step"] == pytest.approx(20.0 / 20)
    all_final = statistics.fmean([.8, .9, .7])
    assert report["all_final"] == pytest.approx(all_final)
    # 50% of `all` is 0.4: seeds 1 and 2 pass it at step 20 (0.3, 0.2 at step 10), seed 3 at step 10 (0.45)
    assert ist["to_50"] == {"reached": 3, "of": 3, "steps": pytest.approx(50 / 3), "seconds": pytest.approx(50 / 3)}
    assert ist["to_80"]["reached"] == 1  # only seed 2 (0.7 >= 0.64)
    pair = next(p for p in report["pairs"] if (p["arm"], p["against"]) == ("ist", "random"))
    diffs = [.6 - .5, .7 - .4, .5 - .6]
    assert pair["final"]["mean_ci95"][0] == pytest.approx(statistics.fmean(diffs))
    assert pair["final"]["sd"] == pytest.approx(statistics.stdev(diffs))
    k = pair["final"]["seeds_for_effect"]  # the smallest k with (t(k-1) + z_0.8) sd / sqrt(k) <= effect
    from istune.bench.stats import t_quantile_975
    assert (t_quantile_975(k - 1) + 0.8416) * statistics.stdev(diffs) / math.sqrt(k) <= 0.1
    assert (t_quantile_975(k - 2) + 0.8416) * statistics.stdev(diffs) / math.sqrt(k - 1) > 0.1
    assert report["arms"]["quarter:4"]["seeds"] == [1, 2] and "quarter:4" not in [p["arm"] for p in report["pairs"]
                                                                                 if p["against"] == "quarter:4"]


def test_mechanism_against_the_quarters(folder):
    found = build_report(folder)["mechanism"]
    assert found["quarter_layers"] == [[0, 1], [2, 3], [4, 5], [6, 7]] and found["best_quarter"] == 4
    assert found["quarter_value"] == pytest.approx([0.1, 0.3, 0.5, 0.9])
    ist = found["arms"]["ist"]
    # selections per step of 20: layer 6 twice, 7 twice, 5 once, 0 once -> quarter shares 1/40, 0, 1/40, 4/40
    assert ist["selection_by_quarter"] == pytest.approx([0.5 / 20, 0, 0.5 / 20, 2 / 20])
    assert ist["spearman"] == pytest.approx(spearman([1, 0, 1, 4], [1, 3, 5, 9]))
    seed = ist["seeds"]["1"]
    assert seed["importance_by_quarter"] == pytest.approx([0, 0, 0, 2.5])
    assert seed["ranks_best_first"] and seed["top_overlap"] == 1.0 and seed["updates"] == 2
    assert seed["settled_at_step"] == 20  # after the first update the third quarter led
    assert "ist" in found["arms"] and "seeds" not in found["arms"]["random"]


def test_the_quarters_value_can_come_from_another_comparison(folder, tmp_path):
    """A comparison without the quarter arms (the oracle run on new seeds) reads the layers' value from a pilot's
    folder: the same mechanism as when the quarters ran beside the rules."""
    import shutil

    rules = tmp_path / "rules"
    (rules / "runs").mkdir(parents=True)
    plan = json.loads((folder / COMPARE_FILE).read_text())
    (rules / COMPARE_FILE).write_text(json.dumps({**plan, "arms": ["all", "random", "ist"]}))
    for arm in ("all", "random", "ist"):
        for seed in (1, 2, 3):
            shutil.copytree(comparison_run_folder(folder, arm, seed), comparison_run_folder(rules, arm, seed))
    assert build_report(rules)["mechanism"] is None
    found = build_report(rules, quarters_from=folder)["mechanism"]
    same = build_report(folder)["mechanism"]
    assert found["quarter_value"] == same["quarter_value"] and found["arms"]["ist"] == same["arms"]["ist"]
    assert found["quarters_from"] == str(folder)
    assert f"the quarter arms' final accuracy (the runs in `{folder}`)" in write_report(rules, quarters_from=folder)
    with pytest.raises(ValueError, match="--quarters_from=.*holds no istune compare runs"):
        build_report(rules, quarters_from=tmp_path / "nowhere")


def test_write_report_writes_the_three_files(folder):
    text = write_report(folder)
    assert (folder / "results.md").read_text() == "# istune compare\n\n" + text
    assert json.loads((folder / "report.json").read_text())["arms"]["all"]["seeds"] == [1, 2, 3]
    assert (folder / "curves.png").stat().st_size > 1000
    assert "| ist | 3 | 60.0 ±" in text and "Layers that matter" in text and "| ist | 1 | 2 |" in text


def test_a_folder_without_a_comparison_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no istune compare runs"):
        build_report(tmp_path)
