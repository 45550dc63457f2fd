"""Trainable parameters and peak training memory per PEFT method, with and without IST (paper Table 1).

Run (from the repository root; about 12 minutes on 2 CPU cores)::

    PYTHONPATH=src .venv/bin/python benchmarks/methods_table.py

It writes benchmarks/results/methods_table.json and .md (each written whole, then renamed
into place). ``--tiny`` runs a seconds-long smoke version of the same thing.

Setting: GPT2Config defaults (GPT-2 small: 12 layers, hidden 768, vocab 50257), random
weights, fp32, batch 1 x 1024 tokens, dropout on, eager attention (the paper left flash
attention out), AdamW. The paper's Table 1 rows:

- Series: bottleneck 256 on the MLP, output side of c_proj and input side of c_fc
  (the paper's {Up, Down} placement, eq. 13);
- Parallel: bottleneck 256 beside c_fc (eq. 11);
- LoRA: r=32, alpha 64, dropout 0.05 on c_attn, both c_proj and c_fc (attention + MLP).

Each runs ``--steps`` optimizer steps with strategy 'all' (plain PEFT) and 'ist' (N_u = 25%,
3 of 12 layers) inside istune.bench.MemoryTracker, which counts live tensor storages (bytes
of storages, not allocator blocks) and splits the peak into weights / gradients /
optimizer state / saved activations / other. IST's selections come from its seeded policy,
the same for every method, so the methods are compared on the same layer draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from istune import ISTConfig, SparseTuner
from istune.adapters import add_paper_bottleneck_adapters
from istune.bench import CATEGORIES, MemoryTracker
from istune.bench.records import run_metadata, write_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GB = 1e9  # tables are in GB (10^9 bytes); the JSON holds bytes

METHODS = ("series", "parallel", "lora")
LABELS = {"series": "Series", "parallel": "Parallel", "lora": "LoRA"}
STRATEGIES = ("all", "ist")
# The paper's Table 1, GPT-2 small (120M): peak GPU memory in GB, without and with IST.
PAPER = {"series": (2.5, 2.0), "parallel": (2.8, 2.1), "lora": (2.9, 2.2), "weights_gb": 0.4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per run (Adam state appears after the first)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (the paper: 1024)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (the paper: 32)")
    parser.add_argument("--bottleneck-size", type=int, default=256, help="series/parallel bottleneck (the paper: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tiny", action="store_true", help="a 4-layer, 64-wide model on 64 tokens: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS / "methods_table.json",
                        help="JSON result; the .md goes beside it")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON at --out (no runs)")
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> GPT2Config:
    if args.tiny:
        return GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=503, n_positions=args.seq_len,
                          attn_implementation="eager")
    return GPT2Config(n_positions=max(1024, args.seq_len), attn_implementation="eager")  # GPT-2 small


def build(method: str, args: argparse.Namespace) -> torch.nn.Module:
    """A GPT-2-shaped model with the method's adapters; only the adapters are trainable."""
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(model_config(args))
    if method == "lora":
        config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                 target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # Conv1D
        model = peft.get_peft_model(model, config)
    else:
        model = add_paper_bottleneck_adapters(model, method, bottleneck_size=args.bottleneck_size)
    return model.train()


def run(method: str, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` steps of one method and strategy inside a MemoryTracker."""
    model = build(method, args)
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                      generator=torch.Generator().manual_seed(args.seed))
    batch = {"input_ids": x, "labels": x}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)  # over every adapter: any layer can train when chosen
    tuner = SparseTuner(model, ISTConfig(strategy=strategy), optimizer=optimizer)
    per_layer = [sum(p.numel() for p in layer.parameters) for layer in tuner.layers]
    steps = []
    start = time.perf_counter()
    with MemoryTracker(model, optimizer) as tracker:
        for step in range(args.steps):
            with tracker.region(f"step {step}"):
                selected = tuner.begin_step()
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tuner.end_step(probe_batch=batch)
            steps.append({"step": step, "selected": list(selected), "loss": round(loss.item(), 4),
                          "trained_params": sum(per_layer[j] for j in selected)})
            del loss
    seconds = time.perf_counter() - start
    report = tracker.report()
    for record, region in zip(steps, report["regions"]):
        record.update({k: region[k] for k in ("peak_bytes", "peak_phase", "peak_breakdown")})
    tuner.close()
    return {
        "method": method,
        "strategy": strategy,
        "num_layers": tuner.num_layers,
        "update_layers": tuner.counts.update_layers,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "params_trained_per_step": max(s["trained_params"] for s in steps),
        "seconds": round(seconds, 1),
        "peak_bytes": report["peak_bytes"],
        "peak_breakdown": report["peak_breakdown"],
        "peak_phase": report["peak_phase"],
        "category_max": report["category_max"],
        "allocator_peak_bytes": report["allocator_peak_bytes"],
        "steps": steps,
    }


# ---------------------------------------------------------------------------- output


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"






def main_table(results: dict[str, dict[str, dict]]) -> list[str]:
    rows = ["| method | trainable params | trained per step (IST) | peak GB | peak GB +IST | +IST / plain | "
            "IST step peaks GB (ratio) | paper GB | paper GB +IST | paper ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, pair in results.items():
        plain, ist = pair["all"], pair["ist"]
        paper_plain, paper_ist = PAPER[method]
        low, high = (f(s["peak_bytes"] for s in ist["steps"]) for f in (min, max))
        rows.append(f"| {LABELS[method]} | {millions(plain['params_trainable'])} | "
                    f"{millions(ist['params_trained_per_step'])} | {gb(plain['peak_bytes'])} | "
                    f"{gb(ist['peak_bytes'])} | {ist['peak_bytes'] / plain['peak_bytes']:.2f} | "
                    f"{gb(low)}–{gb(high)} ({low / plain['peak_bytes']:.2f}–{high / plain['peak_bytes']:.2f}) | "
                    f"{paper_plain} | {paper_ist} | {paper_ist / paper_plain:.2f} |")
    return rows


def breakdown_table(results: dict[str, dict[str, dict]]) -> list[str]:
    rows = ["| run | peak GB | phase | " + " | ".join(CATEGORIES) + " |",
            "|---|---:|---|" + "---:|" * len(CATEGORIES)]
    for method, pair in results.items():
        for strategy in STRATEGIES:
            r = pair[strategy]
            cells = " | ".join(gb(r["peak_breakdown"][c]) for c in CATEGORIES)
            label = LABELS[method] + (" + IST" if strategy == "ist" else "")
            rows.append(f"| {label} | {gb(r['peak_bytes'])} | {r['peak_phase']} | {cells} |")
    return rows


def markdown(results: dict[str, dict[str, dict]], meta: dict) -> str:
    args = meta["args"]
    first = next(iter(results.values()))["ist"]
    lowest = ", ".join(str(min(s["selected"])) for s in first["steps"])
    same = all([s["selected"] for s in pair["ist"]["steps"]] == [s["selected"] for s in first["steps"]]
               for pair in results.values())
    n_update, n_layers = first["update_layers"], first["num_layers"]
    lines = [
        "# Trainable parameters and peak training memory per method, with and without IST (paper Table 1)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; commit: {meta['commit']}",
        f"- machine: {meta['machine']}; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, peft {meta['versions']['peft']}",
        f"- setting: GPT-2-small shape ({meta['num_layers']} layers, hidden {meta['hidden']}, "
        f"vocab {meta['vocab_size']}), random init, fp32, batch {args['batch_size']} × {args['seq_len']} tokens, "
        "eager attention, dropout on, AdamW, "
        f"{args['steps']} steps per run. Series: bottleneck {args['bottleneck_size']} on c_fc (input side) and the MLP "
        f"c_proj (output side); Parallel: bottleneck {args['bottleneck_size']} beside c_fc; LoRA: r={args['rank']} on "
        "c_attn, both c_proj and c_fc. "
        f"IST: N_u = 25% ({n_update} of {n_layers} layers), {'the same' if same else 'different'} seeded draws "
        "for every method.",
        "- memory: the peak over the run of live tensor storages, counted by `istune.bench.MemoryTracker` "
        "(GB = 10^9 bytes; no CUDA context or allocator rounding). The paper measured peak GPU memory on a GPU "
        "with Alpaca prompts of up to 1024 tokens, so absolute numbers differ; compare the ratios.",
        "",
        "## Table",
        "",
        *main_table(results),
        "",
        "`trainable params`: what the optimizer holds (every layer's adapters; the same with and without IST). "
        "`trained per step`: the adapters of the N_u layers IST trains in one step. `peak`: the largest total over "
        "the run; `IST step peaks`: the lightest and the heaviest IST step, and their ratio to the plain peak.",
        "",
        "## Where the peak goes (GB)",
        "",
        *breakdown_table(results),
        "",
        "## Reading it",
        "",
        f"An IST step's memory is set by its lowest selected layer: every layer above it keeps the activations the "
        f"backward pass needs to reach it, trained or not; the layers below it save nothing, and the unselected "
        f"layers above it drop only what their adapters' weight gradients would have needed. The lowest selected "
        f"layer per step was {lowest}"
        f"{' in every IST run here' if same else ' in the first IST run'}, so the run's peak is that of a step that "
        "trains layer 0, close to plain PEFT; the lightest step shows what a higher lowest layer saves. The paper's "
        "Table 1 ratios (0.75-0.80) are not reached by the peak over a run in this setting. "
        "`benchmarks/results/memory_first.md` takes the LoRA pair apart in detail.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        out = json.loads(args.out.read_text())
        write_atomic(args.out.with_suffix(".md"), markdown(out["results"], out["meta"]))
        print(f"wrote {args.out.with_suffix('.md')} from {args.out}")
        return out
    if args.tiny and args.seq_len == 1024:
        args.seq_len, args.rank, args.bottleneck_size, args.steps = 64, 4, 8, min(args.steps, 2)
    config = model_config(args)
    print(f"GPT-2 shape: {config.n_layer} layers, hidden {config.n_embd}, vocab {config.vocab_size}; batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.steps} steps per run, {torch.get_num_threads()} threads",
          flush=True)
    results: dict[str, dict[str, dict]] = {}
    for method in args.methods:
        results[method] = {}
        for strategy in STRATEGIES:
            r = run(method, strategy, args)
            results[method][strategy] = r
            print(f"{LABELS[method]:9s} {strategy:4s}: {millions(r['params_trainable'])} trainable "
                  f"({millions(r['params_trained_per_step'])} per step), peak {gb(r['peak_bytes'])} GB, "
                  f"{r['seconds']} s",
                  flush=True)
    meta = {
        **run_metadata("benchmarks/methods_table.py", argv if argv is not None else sys.argv[1:], REPO),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_layers": config.n_layer, "hidden": config.n_embd, "vocab_size": config.vocab_size,
        "paper_table1_gpt2_small_gb": PAPER,
    }
    out = {"meta": meta, "results": results}
    write_atomic(args.out, json.dumps(out, indent=1) + "\n")
    write_atomic(args.out.with_suffix(".md"), markdown(results, meta))
    print("\n".join(main_table(results)))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
