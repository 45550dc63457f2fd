"""IST under FSDP2: two CPU processes (gloo) launched with the repo's accelerate config file, against one process.

The worker (ddp_worker.py, mode ``fsdp2``) trains the DDP test's tiny LoRA model with the same
4 samples per optimizer step, sharded with ``fully_shard`` by the Trainer (accelerate only
shards on accelerator backends; the worker lifts that for CPU processes, see
``enable_fsdp_on_cpu``), saves a checkpoint at step 3 and resumes from it with FSDP2 set
through TrainingArguments (IST added with ``add_ist``: the one-line form refuses to save FSDP2
checkpoints); then runs SparseTuner in a plain loop on a ``fully_shard`` model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from ..tiny_models import tiny_model
from . import ddp_worker

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILE = REPO / "configs" / "accelerate" / "fsdp2.yaml"
TOLERANCE = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_FILE),
               "--num_processes", "2", "--main_process_port", "0", str(Path(ddp_worker.__file__)), str(out), "fsdp2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"accelerate launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, results


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same training in one process, without FSDP: the reference."""
    trainer, ist, recorder = ddp_worker.train(str(tmp_path_factory.mktemp("one")), world_size=1, rank=0,
                                              **ddp_worker.MOMENTUM)
    return ddp_worker._losses(trainer), recorder.selections, ddp_worker.adapter_weights(trainer.model)


def test_trainer_under_fsdp2_matches_a_single_process_run(ranks, single_process):
    out, results = ranks
    losses, selections, weights = single_process
    assert results[0]["sharded"] and results[1]["sharded"]  # the model really was sharded with fully_shard
    assert results[0]["selections"] == results[1]["selections"] == selections
    assert len({tuple(s) for s in selections}) > 1  # the selection changes, or the test would mean little
    assert results[0]["losses"] == pytest.approx(losses, abs=1e-5)
    assert results[0]["importance"] == results[1]["importance"]  # bitwise
    sharded = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    assert sharded[0].keys() == sharded[1].keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(sharded[0][name], sharded[1][name], rtol=0, atol=0)
        torch.testing.assert_close(sharded[0][name], value, **TOLERANCE)


def test_the_one_line_form_refuses_to_save_fsdp2_checkpoints_naming_add_ist(ranks):
    _, results = ranks
    for result in results:
        assert result["one_line_saving"].startswith("ValueError: ISTCallback under FSDP2 with save_strategy='steps' "
                                                    "needs the Trainer")
        assert "istune.add_ist(trainer, config)" in result["one_line_saving"]


def test_only_selected_layers_get_gradients_and_move_under_fsdp2(ranks):
    _, results = ranks
    for result in results:
        assert result["violations"] == result["resumed"]["violations"] == []


def test_resume_under_fsdp2_continues_exactly(ranks):
    out, results = ranks
    resumed = results[0]["resumed"]
    assert resumed["sharded"]
    assert resumed["selections"] == results[0]["selections"][3:]
    assert resumed["losses"] == pytest.approx(results[0]["losses"][3:], abs=1e-6)
    assert resumed["importance"] == pytest.approx(results[0]["importance"], abs=1e-9)
    final, continued = load_file(str(out / "rank0.safetensors")), load_file(str(out / "resumed0.safetensors"))
    for name, value in final.items():
        torch.testing.assert_close(continued[name], value, rtol=0, atol=1e-6)


def test_saved_adapter_is_a_full_state_dict_that_plain_peft_loads(ranks):
    out, _ = ranks
    final = load_file(str(out / "rank0.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=ddp_worker.NUM_LAYERS), str(out / "adapter"))
    weights = ddp_worker.adapter_weights(loaded)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in weights} == set(range(ddp_worker.NUM_LAYERS))
    assert weights.keys() == final.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0)


def test_drifting_ranks_fail_loudly_under_fsdp2(ranks):
    _, results = ranks
    for result in results:
        assert result["importance_drift"].startswith("RuntimeError: IST ranks are out of sync after 6 optimizer steps")


def test_sparse_tuner_on_a_fully_shard_model_matches_a_single_process_loop(ranks):
    out, results = ranks
    reference = ddp_worker.sharded_loop(rank=0, world_size=1)
    for result in results:
        assert result["plain_loop"]["selections"] == reference["selections"]
        assert result["plain_loop"]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert results[0]["plain_loop"]["importance"] == results[1]["plain_loop"]["importance"]
    assert results[0]["plain_loop"]["importance"] == pytest.approx(reference["importance"], abs=1e-6)
    sharded = load_file(str(out / "loop0.safetensors"))
    for name, value in reference["weights"].items():
        torch.testing.assert_close(sharded[name], value, **TOLERANCE)


def test_full_layers_with_ist_are_refused_under_fsdp2_and_random_works(ranks):
    _, results = ranks
    for result in results:
        assert result["full_layers_ist"].startswith("NotImplementedError: Full-layer (LISA-style) tuning with "
                                                    "strategy 'ist' is not supported under FSDP2")
        assert result["full_layers_random"] == "no error"
        # the refusal reads the rule's capabilities (suppression probes), not its name (issue 35)
        assert result["full_layers_probe_once"].startswith("NotImplementedError: Full-layer (LISA-style) tuning with "
                                                           "strategy 'probe-once' is not supported under FSDP2")
        assert result["full_layers_own_rule"].startswith("NotImplementedError: Full-layer (LISA-style) tuning with "
                                                         "strategy 'suppressing' is not supported under FSDP2")
