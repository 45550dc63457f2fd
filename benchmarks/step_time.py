"""Time per optimizer step: LoRA, LoRA + random sparse, LoRA + IST, and LISA-style full-layer sparse tuning.

    .venv/bin/python benchmarks/step_time.py                       # SmolLM2-135M, batch 4 x 256 tokens, CPU
    .venv/bin/python benchmarks/step_time.py --steps 4 --rounds 2  # a quick look

All strategies live in one process and are measured in interleaved rounds (round r runs
``--steps`` steps of every strategy in turn), so a slow spell of a shared machine hits all
of them alike. Reported: median forward, backward, optimizer and whole-step seconds, the
importance probes' cost amortised per step (IST: N_c forwards every T_c steps), and the
ratio to LoRA. Results go to ``benchmarks/results/step_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from istune import ISTConfig, SparseTuner
from istune.bench.records import git_commit, write_atomic
from istune.methods import AdapterArgs, add_adapters
from istune.models import load_model_and_tokenizer

STRATEGIES = {  # name: (PEFT method or None for full layers, IST strategy, layers per step)
    "LoRA (all layers)": ("lora", "all", None),
    "LoRA + random sparse": ("lora", "random", None),
    "LoRA + IST": ("lora", "ist", None),
    "LISA-style (2 full layers)": (None, "random", 2),
}


def build(name: str, opts):
    method, strategy, layers = STRATEGIES[name]
    model, _ = load_model_and_tokenizer(opts.model)
    if method is None:  # LISA: whole decoder layers trainable, embeddings and head frozen
        model.requires_grad_(False)
        model.model.layers.requires_grad_(True)
    else:
        torch.manual_seed(0)
        model = add_adapters(model, AdapterArgs(method=method, rank=32, alpha=64), total_steps=1000)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    config = ISTConfig(strategy=strategy, update_layers=layers) if layers else ISTConfig(strategy=strategy)
    return model, optimizer, SparseTuner(model, config, optimizer=optimizer)


def timed_steps(model, optimizer, tuner, batch, steps, record):
    for _ in range(steps):
        t0 = time.perf_counter()
        tuner.begin_step()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        probed = tuner.end_step(probe_batch=batch) is not None
        t4 = time.perf_counter()
        record["forward"].append(t1 - t0)
        record["backward"].append(t2 - t1)
        record["optimizer"].append(t3 - t2)
        record["step"].append(t3 - t0)
        record["probe_total"] += (t4 - t3) if probed else 0.0
        record["steps"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per strategy per round (T_c = 10: one probe each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/step_time")
    opts = parser.parse_args()

    built = {name: build(name, opts) for name in STRATEGIES}
    ids = torch.randint(0, 49152, (opts.batch_size, opts.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    records = {name: {"forward": [], "backward": [], "optimizer": [], "step": [], "probe_total": 0.0, "steps": 0}
               for name in STRATEGIES}
    for name in STRATEGIES:  # warm-up: one untimed step each (allocations, optimizer state)
        timed_steps(*built[name], batch, 1, {"forward": [], "backward": [], "optimizer": [], "step": [],
                                             "probe_total": 0.0, "steps": 0})
    for round_index in range(opts.rounds):
        for name in STRATEGIES:
            timed_steps(*built[name], batch, opts.steps, records[name])
        print(f"round {round_index + 1}/{opts.rounds} done", flush=True)

    rows = {}
    for name, record in records.items():
        row = {part: statistics.median(record[part]) for part in ("forward", "backward", "optimizer", "step")}
        row["probe_per_step"] = record["probe_total"] / record["steps"]
        row["step_with_probes"] = row["step"] + row["probe_per_step"]
        row["trainable"] = sum(p.numel() for p in built[name][0].parameters() if p.requires_grad)
        rows[name] = row
    base = rows["LoRA (all layers)"]["step_with_probes"]
    lines = ["| strategy | forward s | backward s | optimizer s | step s | probes s/step | total s/step | vs LoRA |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['forward']:.3f} | {row['backward']:.3f} | {row['optimizer']:.3f} | {row['step']:.3f} "
                     f"| {row['probe_per_step']:.3f} | {row['step_with_probes']:.3f} | {row['step_with_probes'] / base:.2f} |")
    table = "\n".join(lines)
    print(table)
    commit = git_commit(Path(__file__).resolve().parent.parent)
    out = Path(opts.out)
    meta = {"command": f".venv/bin/python benchmarks/step_time.py {' '.join(f'--{k} {v}' for k, v in vars(opts).items())}",
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": torch.get_num_threads(), "rows": rows}
    for suffix, text in ((".json", json.dumps(meta, indent=2)),
                         (".md", f"# Time per step\n\nCommand: `{meta['command']}`  \nCommit {commit}, {meta['date']}, "
                                 f"{meta['threads']} CPU threads. Medians over {opts.rounds} x {opts.steps} steps.\n\n{table}\n")):
        write_atomic(out.with_suffix(suffix), text)


if __name__ == "__main__":
    main()
