"""IST under DDP: a real torchrun launch of two CPU processes (gloo) against a single-process run.

The worker (ddp_worker.py) arranges the data so that both runs see the same 4 samples per
optimizer step (2 ranks x 1 sample x 2 accumulation micro-batches vs 1 process x 2 x 2) and
the same 4 probe examples (2 per rank vs 4), with non-reentrant activation checkpointing on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from . import ddp_worker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(ddp_worker.__file__)), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    return out, results, weights


def test_ranks_agree_and_match_a_single_process_run(ranks, tmp_path):
    out, results, weights = ranks
    trainer, ist, recorder = ddp_worker.train(str(tmp_path), world_size=1, rank=0)

    assert results[0]["selections"] == results[1]["selections"] == recorder.selections
    assert all(len(s) == 1 for s in recorder.selections) and len(recorder.selections) == ddp_worker.MAX_STEPS
    assert results[0]["importance"] == results[1]["importance"]  # bitwise
    assert results[0]["importance"] == pytest.approx(ist.importance.tolist(), abs=1e-6)  # float32 losses
    assert any(abs(v) > 0 for v in results[0]["importance"])
    reference = ddp_worker.adapter_weights(trainer.model)
    assert weights[0].keys() == weights[1].keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
        torch.testing.assert_close(weights[0][name], reference[name], rtol=1e-4, atol=1e-6)
    assert results[0]["gradient_checkpointing"] and results[1]["gradient_checkpointing"]


def test_only_selected_layers_get_gradients_and_move_on_every_rank(ranks):
    _, results, _ = ranks
    assert results[0]["violations"] == results[1]["violations"] == []


def test_only_the_main_process_writes_the_log(ranks):
    out, _, _ = ranks
    events = [json.loads(line) for line in (out / "trainer" / "ist_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "select"] == list(range(1, ddp_worker.MAX_STEPS + 1))
    assert [e["step"] for e in events if e["event"] == "probe"] == [2, 4, 6]


def test_diverging_ranks_fail_loudly_on_every_rank(ranks):
    _, results, _ = ranks
    for result in results:
        assert result["importance_drift"].startswith(
            "RuntimeError: IST ranks are out of sync after 6 optimizer steps: "
            "rank 1 differs from rank 0 in importance")
        assert "after 0 optimizer steps: rank 1 differs from rank 0 in RNG state, selection" in result["seed_per_rank"]


def test_setups_ddp_cannot_train_are_refused_before_any_step(ranks):
    _, results, _ = ranks
    for result in results:
        assert result["reentrant"].startswith("ValueError: Reentrant activation checkpointing under DDP")
        assert "use_reentrant': False" in result["reentrant"]
        for form in ("find_unused_false", "find_unused_false_explicit"):  # from the arguments; the DDP wrapper
            assert result[form].startswith("ValueError: IST freezes the adapters of unselected layers")
            assert "ddp_find_unused_parameters=True" in result[form]
        assert result["static_graph"].startswith("ValueError: DDP static_graph=True assumes")


def test_sparse_tuner_on_a_ddp_model_in_a_plain_loop(ranks):
    _, results, _ = ranks
    loops = [result["plain_loop"] for result in results]
    assert loops[0] == loops[1]  # selections, importance and adapter weights, from different data per rank
    assert any(abs(v) > 0 for v in loops[0]["importance"])
    for result in results:
        assert result["plain_loop_find_unused_false"].startswith("ValueError: IST freezes the adapters")


def test_every_rule_agrees_across_ranks(ranks):
    _, results, _ = ranks
    assert results[0]["rules"].keys() == set(ddp_worker.RULES)
    for rule, run in results[0]["rules"].items():
        other = results[1]["rules"][rule]
        assert run["selections"] == other["selections"], rule  # each rank measured its own rows: means agree
        assert run["weights_digest"] == other["weights_digest"], rule
        assert all(len(selection) == 1 for selection in run["selections"])
