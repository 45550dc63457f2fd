"""`istune train` under torchrun and accelerate launch: 2 CPU processes (gloo), one output folder, one evaluation.

accelerate launches several CPU processes with ``--multi_gpu --num_processes 2`` on a machine
without GPUs (its ``--cpu`` flag starts one process whatever --num_processes says).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import train_args

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", "29517"],
}


@pytest.fixture(scope="module")
def launched(tiny_llama_dir, data_file, tmp_path_factory):
    runs = {}
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for name, launcher in LAUNCHERS.items():
        if name == "accelerate" and not Path(launcher[0]).is_file():
            pytest.skip("accelerate's launcher is not installed beside this Python")
        out = tmp_path_factory.mktemp(name) / "run"
        command = launcher + ["-m", "istune"] + train_args(tiny_llama_dir, data_file, out, "--learning_rate", "1e-2")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        runs[name] = (out, done.stdout + done.stderr)
    return runs


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_train_and_only_the_main_one_writes_and_evaluates(launched, launcher):
    out, printed = launched[launcher]
    results = json.loads((out / "results.json").read_text())
    # 24 examples, batch 2 per process: 6 steps per epoch with 2 processes (12 with one).
    first = next(entry for entry in results["log_history"] if "loss" in entry)
    assert first["epoch"] == pytest.approx(1 / 6)
    assert printed.count("istune: evaluating the tuned model") == 1 and printed.count("istune train: done") == 1
    assert printed.count("held-out loss") == 1
    assert sorted(path.name for path in out.iterdir()) == ["adapter", "ist_log.jsonl", "istune_run.json",
                                                           "results.json"]
    events = [json.loads(line) for line in (out / "ist_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "select"] == [1, 2, 3, 4]  # one writer, no duplicates


def test_both_launchers_train_the_same_adapters(launched):
    (torchrun, _), (accelerate, _) = launched["torchrun"], launched["accelerate"]
    a = load_file(str(torchrun / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(accelerate / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    importance = [json.loads((run / "results.json").read_text())["importance"] for run in (torchrun, accelerate)]
    assert importance[0] == importance[1] and any(v != 0 for v in importance[0])
