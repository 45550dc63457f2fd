"""Peak training memory of LoRA and LoRA+IST on a GPT-2-small-shaped model (the paper's Table 1).

Run (from the repository root; about 3 minutes of compute on 2 CPU cores, 6 on a busy machine)::

    PYTHONPATH=src .venv/bin/python benchmarks/memory_first.py

It writes benchmarks/results/memory_first.json and .md (each written whole, then
renamed into place). ``--tiny`` runs a seconds-long smoke version of the same thing.

What it measures: GPT2Config defaults (12 layers, hidden 768, vocab 50257), random
weights, fp32, batch 1 x 1024 tokens, dropout on (train mode), eager attention (the
paper left flash attention out), LoRA rank 32 (alpha 64, dropout 0.05) on c_attn and
both c_proj (attention) and c_fc (MLP), AdamW. Each strategy runs a few optimizer
steps inside istune.bench.MemoryTracker, which counts live tensor storages and splits
the peak into weights / gradients / optimizer state / saved activations / other, with
the saved activations attributed to the decoder layer that saved them. IST uses
ISTConfig's defaults (N_u = 25% of layers = 3 of 12); after the steps one
importance update (N_c = 3 no-grad probe forwards) is measured on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from istune import ISTConfig, SparseTuner
from istune.bench import CATEGORIES, MemoryTracker
from istune.bench.records import run_metadata, write_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GB = 1e9  # tables are in GB (10^9 bytes); the JSON holds bytes

# The paper's Table 1, GPT-2 small (120M), LoRA column pair.
PAPER = {"lora_gb": 2.9, "ist_gb": 2.2, "ratio": round(2.2 / 2.9, 2), "weights_gb": 0.4}

STRATEGIES = {"lora": "all", "ist": "ist"}  # our name -> ISTConfig.strategy
LABELS = {"lora": "LoRA", "ist": "LoRA+IST"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per strategy (Adam state appears after the first)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (the paper: 1024)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (the paper: 32)")
    parser.add_argument("--attention", default="eager", choices=["eager", "sdpa"],
                        help="attention kernel; eager materialises the T x T attention matrices, as the paper's runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-probe", action="store_true", help="skip measuring one importance update")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer, 64-wide model on 64 tokens: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_first.json",
                        help="JSON result; the .md goes beside it")
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> GPT2Config:
    if args.tiny:
        return GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=503, n_positions=args.seq_len,
                          attn_implementation=args.attention)
    return GPT2Config(n_positions=max(1024, args.seq_len), attn_implementation=args.attention)  # GPT-2 small


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(model_config(args)).to(getattr(torch, args.dtype))
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)  # GPT-2 uses Conv1D
    model = get_peft_model(model, lora)
    model.train()
    return model


def run_strategy(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` steps with one strategy inside a MemoryTracker; return the measurement."""
    model = build(args)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    batch = {"input_ids": x, "labels": x}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)  # built before the first begin_step: holds every adapter
    tuner = SparseTuner(model, ISTConfig(strategy=STRATEGIES[name]), optimizer=optimizer)
    scopes = {f"layer {layer.index}": model.get_submodule(layer.name) for layer in tuner.layers}
    steps = []
    start = time.perf_counter()
    with MemoryTracker(model, optimizer, scopes=scopes) as tracker:
        for step in range(args.steps):
            with tracker.region(f"step {step}"):
                selected = sorted(tuner.begin_step())
                loss = model(**batch).loss  # the output (and its logits) is dropped here, as in Trainer
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                probe = tuner.end_step(probe_batch=batch)
            steps.append({"step": step, "selected": selected, "probe_ran": probe is not None,
                          "loss": round(loss.item(), 4)})
            del loss
        if name == "ist" and not args.no_probe:
            with tracker.region("importance update"):
                tuner.update_importance(batch)
    seconds = time.perf_counter() - start
    report = tracker.report()
    for record, region in zip(steps, report["regions"]):
        keys = ("peak_bytes", "peak_phase", "peak_breakdown", "peak_activations_by_scope")
        record.update({k: region[k] for k in keys})
    probe_region = next((r for r in report["regions"] if r["name"] == "importance update"), None)
    tuner.close()
    return {
        "strategy": name,
        "ist_config": tuner.config.to_dict() | {"update_layers_resolved": tuner.counts.update_layers},
        "num_layers": tuner.num_layers,
        "lora_branch_saved_bytes_per_layer": lora_branch_bytes(
            model, model.get_submodule(tuner.layers[0].name), args.batch_size * args.seq_len),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in trainable),
        "seconds": round(seconds, 1),
        "peak_bytes": report["peak_bytes"],
        "peak_breakdown": report["peak_breakdown"],
        "peak_phase": report["peak_phase"],
        "peak_activations_by_scope": report["peak_activations_by_scope"],
        "category_max": report["category_max"],
        "steps": steps,
        "importance_update": probe_region,
        "allocator_peak_bytes": report["allocator_peak_bytes"],
    }


# ---------------------------------------------------------------------------- output


def gb(n: float) -> str:
    return f"{n / GB:.3f}"


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"




def display_path(path: Path) -> str:
    """The path relative to the repository when inside it (results should not name a home directory)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)




def summary_table(results: dict[str, dict]) -> list[str]:
    """Rows of the main table: peak and its split, LoRA, IST, IST/LoRA, and the paper."""
    lora, ist = results["lora"], results["ist"]
    ratio = ist["peak_bytes"] / lora["peak_bytes"]
    head = ["| | peak (GB) | " + " | ".join(CATEGORIES) + " | IST/LoRA |",
            "|---|---:|" + "---:|" * len(CATEGORIES) + "---:|"]
    rows = []
    for r, tail in ((lora, ""), (ist, f"{ratio:.2f}")):
        cells = " | ".join(gb(r["peak_breakdown"][c]) for c in CATEGORIES)
        rows.append(f"| {LABELS[r['strategy']]} (measured, at the peak) | {gb(r['peak_bytes'])} | {cells} | {tail} |")
    for r in (lora, ist):
        cells = " | ".join(gb(r["category_max"][c]) for c in CATEGORIES)
        rows.append(f"| {LABELS[r['strategy']]} (each category's own max) | | {cells} | |")
    blanks = " | ".join("" for _ in CATEGORIES[1:])
    rows.append(f"| LoRA (paper, Table 1) | {PAPER['lora_gb']} | {PAPER['weights_gb']} | {blanks} | |")
    rows.append(f"| LoRA+IST (paper, Table 1) | {PAPER['ist_gb']} | {PAPER['weights_gb']} | {blanks} "
                f"| {PAPER['ratio']} |")
    return head + rows


def step_table(result: dict) -> list[str]:
    rows = ["| step | selected layers | lowest | peak (GB) | phase | " + " | ".join(CATEGORIES) + " |",
            "|---:|---|---:|---:|---|" + "---:|" * len(CATEGORIES)]
    n_layers = result["num_layers"]
    for s in result["steps"]:
        sel = "all" if len(s["selected"]) == n_layers else ", ".join(map(str, s["selected"]))
        cells = " | ".join(gb(s["peak_breakdown"][c]) for c in CATEGORIES)
        rows.append(f"| {s['step']} | {sel} | {min(s['selected'])} | {gb(s['peak_bytes'])} | {s['peak_phase']} "
                    f"| {cells} |")
    probe = result.get("importance_update")
    if probe:
        cells = " | ".join(gb(probe["peak_breakdown"][c]) for c in CATEGORIES)
        rows.append(f"| importance update (probe forwards, no grad) | | | {gb(probe['peak_bytes'])} "
                    f"| {probe['peak_phase']} | {cells} |")
    return rows


def lora_branch_bytes(model: torch.nn.Module, block: torch.nn.Module, tokens: int) -> int:
    """Bytes a block's LoRA branches save for their own weights' gradients: dropout(x) and lora_A's output."""
    elem = next(model.parameters()).element_size()
    total = 0
    for module in block.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, rank in module.r.items():
                total += tokens * (module.in_features + rank) * elem
    return total


def analysis(results: dict[str, dict], meta: dict) -> list[str]:
    """Where the memory goes, in figures taken from this measurement (statements follow the data)."""
    lora, ist = results["lora"], results["ist"]
    n_layers = lora["num_layers"]
    n_update = ist["ist_config"]["update_layers_resolved"]
    args = meta["args"]
    elem = torch.tensor([], dtype=getattr(torch, args["dtype"])).element_size()
    logits = args["batch_size"] * args["seq_len"] * meta["vocab_size"] * elem
    lb, ib = lora["peak_breakdown"], ist["peak_breakdown"]
    peak_step = max(ist["steps"], key=lambda s: s["peak_bytes"])
    best_step = min(ist["steps"], key=lambda s: s["peak_bytes"])
    lowest_drawn = min(min(s["selected"]) for s in ist["steps"])
    lora_layers = lora["peak_activations_by_scope"]
    per_layer = sum(lora_layers.values()) / n_layers
    outside_layers = lb["activations"] - sum(lora_layers.values())
    peak_layers = peak_step["peak_activations_by_scope"]
    sel = sorted(peak_step["selected"])
    low = sel[0]
    above = [i for i in range(low, n_layers) if i not in sel]
    below = list(range(low))
    above_mean = sum(peak_layers[f"layer {i}"] for i in above) / len(above) if above else 0.0
    sel_mean = sum(peak_layers[f"layer {i}"] for i in sel) / len(sel)
    branch = ist["lora_branch_saved_bytes_per_layer"]
    delta = {c: lb[c] - ib[c] for c in ("activations", "other", "gradients", "optimizer")}
    opt_steps = [s["peak_breakdown"]["optimizer"] for s in ist["steps"]]
    # P(lowest selected layer = l) for N_u of N_L drawn uniformly; peak(l) = the layer-0 peak minus l unselected layers
    p_low = [math.comb(n_layers - 1 - l, n_update - 1) / math.comb(n_layers, n_update) for l in range(n_layers)]
    p_zero = p_low[0]
    zero_steps = [s["peak_bytes"] for s in ist["steps"] if min(s["selected"]) == 0]
    zero_peak = max(zero_steps) if zero_steps else ist["peak_bytes"] + low * above_mean
    expected_step = sum(p * (zero_peak - l * above_mean) for l, p in enumerate(p_low))
    ratio = ist["peak_bytes"] / lora["peak_bytes"]

    which = ("whose lowest selected layer is the lowest any step drew" if low == lowest_drawn
             else f"although another step drew a lower layer ({lowest_drawn})")
    lines = [
        f"- **Total.** LoRA peaks at {gb(lora['peak_bytes'])} GB, LoRA+IST at {gb(ist['peak_bytes'])} GB: "
        f"ratio {ratio:.2f}, against the paper's {PAPER['ratio']} ({PAPER['lora_gb']} → {PAPER['ist_gb']} GB). "
        f"IST's peak over the run is the peak of one step: step {peak_step['step']} (layers {sel}), {which}. "
        f"Its lightest step, step {best_step['step']} (lowest layer {min(best_step['selected'])}), peaked at "
        f"{gb(best_step['peak_bytes'])} GB ({best_step['peak_bytes'] / lora['peak_bytes']:.2f} of LoRA).",
        f"- **What IST saved at the peak:** activations {mb(delta['activations'])}, other {mb(delta['other'])}, "
        f"gradients {mb(delta['gradients'])}, optimizer state {mb(delta['optimizer'])}.",
        f"- **When.** The LoRA peak falls in the {lora['peak_phase']} phase, the IST peak in the "
        f"{ist['peak_phase']} phase. Parameter gradients alive at the peak: {mb(lb['gradients'])} (LoRA), "
        f"{mb(ib['gradients'])} (IST). IST's gradients are smaller at their own maximum "
        f"({mb(ist['category_max']['gradients'])} vs {mb(lora['category_max']['gradients'])}), but "
        + ("that maximum comes later in the backward pass, when most saved activations are already freed, so it "
           "does not lower the peak." if lb["gradients"] == 0 and ib["gradients"] == 0 else
           "only the part alive at the peak counts."),
        f"- **Weights** ({mb(lb['weights'])}, {lb['weights'] / lora['peak_bytes']:.0%} of LoRA's peak) are the same "
        f"for both: the frozen base model in {args['dtype']} plus the adapters (the paper lists 0.4 GB).",
        f"- **Logits and loss** are not layer memory, so IST cannot touch them. The logits are "
        f"{args['batch_size']}×{args['seq_len']}×{meta['vocab_size']} × {elem} B = {mb(logits)}; the loss saves its "
        f"log-softmax (another {mb(logits)}), and its backward makes the gradient of the log-softmax and then of "
        f"the logits ({mb(logits)} each). At the peak `other` (unsaved tensors, activation gradients) is "
        f"{mb(lb['other'])} for LoRA and {mb(ib['other'])} for IST; saved activations outside the decoder layers "
        f"(embeddings, final norm, lm head, loss) are {mb(outside_layers)}.",
        f"- **Activations of the decoder layers.** LoRA saves {mb(per_layer)} per layer "
        f"({mb(sum(lora_layers.values()))} for {n_layers} layers). In IST's peak step "
        + (f"the {len(below)} layers below the lowest selected layer saved "
           f"{mb(sum(peak_layers[f'layer {i}'] for i in below))} in all (no gradient has to reach them); "
           if below else "no layer lies below the lowest selected one (layer 0), so every layer keeps activations; ")
        + f"each selected layer saved {mb(sel_mean)}; each of the {len(above)} unselected layers "
        f"above the lowest selected one still saved {mb(above_mean)} ({above_mean / per_layer:.0%} of a LoRA "
        f"layer), because the gradient has to flow through it down to the lowest selected layer: attention "
        f"probabilities, dropout masks, MLP and layer-norm inputs stay. What such a layer drops is its LoRA "
        f"branches' inputs, dropout(x) and lora_A(x), computed from the shapes as {mb(branch)} per layer "
        f"(measured: {mb(per_layer - above_mean)}). So IST's activation saving is set by the lowest selected "
        f"layer: with N_u = {n_update} of {n_layers} layers drawn uniformly (importance starts at zero), the "
        f"lowest is on average layer {(n_layers + 1) / (n_update + 1) - 1:.2f} (0-based); in this run the lowest "
        f"selected layer per step was {', '.join(str(min(s['selected'])) for s in ist['steps'])}.",
        f"- **Peak of a run vs peak of a step.** A step draws layer 0 with probability {p_zero:.0%} "
        f"(N_u/N_L under uniform selection), so the chance that a run of n steps contains such a step is "
        f"1 − {1 - p_zero:.2f}^n ({1 - (1 - p_zero) ** 10:.0%} after 10 steps): the peak of a training run of more "
        f"than a few steps is the lowest-layer-0 case, {gb(zero_peak)} GB here "
        f"({'measured' if zero_steps else 'estimated: no step drew layer 0'}; {zero_peak / lora['peak_bytes']:.2f} "
        f"of LoRA). A single step is lighter on average: taking each layer below the lowest selected one off at "
        f"the measured {mb(above_mean)}, the expected per-step peak is about {gb(expected_step)} GB "
        f"({expected_step / lora['peak_bytes']:.2f} of LoRA; the paper: {PAPER['ratio']}, which this estimate "
        f"reaches at a lowest selected layer of about "
        f"{(zero_peak - PAPER['ratio'] * lora['peak_bytes']) / above_mean if above_mean else float('nan'):.1f}). "
        f"Later in training the learned importance can concentrate the choice on higher layers, but sampling "
        f"keeps every layer a chance (p_i ~ U(0, σ(I_i))), so the allocator must still fit the layer-0 step.",
        f"- **Optimizer state** of a layer appears the first time the layer is selected, and AdamW keeps it: at "
        f"IST's per-step peaks it went {', '.join(mb(v) for v in opt_steps)} over steps 0–{len(opt_steps) - 1}, "
        f"while LoRA holds {mb(lora['category_max']['optimizer'])}. Once every layer has been selected IST holds "
        f"as much as LoRA; with {lora['params_trainable'] / 1e6:.1f} M LoRA parameters it is small beside the "
        f"activations either way.",
    ]
    probe = ist.get("importance_update")
    if probe:
        lines.append(f"- **Importance update.** The N_c = {ist['ist_config']['num_probes']} probe forwards run "
                     f"without gradients and peak at {gb(probe['peak_bytes'])} GB "
                     f"({'below' if probe['peak_bytes'] < ist['peak_bytes'] else 'above'} the training peak).")
    return lines


def markdown(results: dict[str, dict], meta: dict) -> str:
    args = meta["args"]
    lines = [
        "# Peak training memory: LoRA vs LoRA+IST on GPT-2 small (paper Table 1)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; commit: {meta['commit']}",
        f"- machine: {meta['machine']}; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, peft {meta['versions']['peft']}",
        f"- setting: GPT-2-small shape ({meta['num_layers']} layers, hidden {meta['hidden']}, vocab "
        f"{meta['vocab_size']}), random init, {args['dtype']}, batch {args['batch_size']} × {args['seq_len']} tokens, "
        f"{args['attention']} attention, dropout on, LoRA r={args['rank']} on c_attn, c_proj, c_fc, AdamW, "
        f"{args['steps']} steps per strategy; IST defaults (N_u = 25%). Wall time: LoRA {results['lora']['seconds']} s, "
        f"LoRA+IST {results['ist']['seconds']} s (importance update included).",
        "- memory: live tensor storages counted by `istune.bench.MemoryTracker` (bytes of storages, not allocator "
        "blocks; GB = 10^9 bytes). `activations` = tensors autograd saved for backward; `other` = everything "
        "else alive (logits, loss, activation gradients, temporaries).",
        "",
        "## Peak memory (GB)",
        "",
        *summary_table(results),
        "",
        "The paper reports the peak GPU memory on a real GPU (fp16 or fp32 is not stated for GPT-2; its 0.4 GB weight "
        "figure is between the two), with Alpaca prompts of up to 1024 tokens; here every sequence is 1024 tokens "
        "and the count excludes CUDA context and allocator rounding, so absolute numbers differ; the ratio is the "
        "comparable figure.",
        "",
    ]
    for name in ("lora", "ist"):
        lines += [f"## Per-step peaks: {LABELS[name]} (GB)", "", *step_table(results[name]), ""]
    lines += ["## Where the memory goes that IST does not save", "", *analysis(results, meta), ""]
    return "\n".join(lines)


def print_table(results: dict[str, dict]) -> None:
    lora = results["lora"]
    print(f"\n{'':28s}{'peak GB':>9s}" + "".join(f"{c:>12s}" for c in CATEGORIES) + f"{'IST/LoRA':>10s}")
    for name in ("lora", "ist"):
        r = results[name]
        ratio = f"{r['peak_bytes'] / lora['peak_bytes']:.2f}" if name == "ist" else ""
        print(f"{LABELS[name] + ' (measured)':28s}{gb(r['peak_bytes']):>9s}"
              + "".join(f"{gb(r['peak_breakdown'][c]):>12s}" for c in CATEGORIES) + f"{ratio:>10s}")
    print(f"{'LoRA (paper)':28s}{PAPER['lora_gb']:>9.1f}")
    print(f"{'LoRA+IST (paper)':28s}{PAPER['ist_gb']:>9.1f}" + " " * 12 * len(CATEGORIES) + f"{PAPER['ratio']:>10.2f}")
    for name in ("lora", "ist"):
        print(f"\nper-step peaks, {LABELS[name]}:")
        for s in results[name]["steps"]:
            print(f"  step {s['step']}: {gb(s['peak_bytes'])} GB, selected {s['selected']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.tiny and args.seq_len == 1024:
        args.seq_len, args.rank, args.steps = 64, 4, min(args.steps, 3)
    config = model_config(args)
    print(f"GPT-2 shape: {config.n_layer} layers, hidden {config.n_embd}, vocab {config.vocab_size}; "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}, LoRA r={args.rank}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {}
    for name in ("lora", "ist"):
        results[name] = run_strategy(name, args)
        r = results[name]
        print(f"{LABELS[name]}: {r['params_trainable'] / 1e6:.2f} M of {r['params_total'] / 1e6:.1f} M parameters "
              f"trainable, peak {gb(r['peak_bytes'])} GB, {r['seconds']} s", flush=True)
    meta = {
        **run_metadata("benchmarks/memory_first.py", argv if argv is not None else sys.argv[1:], REPO),
        "args": {k: (display_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_layers": config.n_layer, "hidden": config.n_embd, "vocab_size": config.vocab_size,
        "paper_table1_gpt2_small": PAPER,
    }
    print_table(results)
    out = {"meta": meta, "results": results,
           "ratio_ist_over_lora": results["ist"]["peak_bytes"] / results["lora"]["peak_bytes"]}
    write_atomic(args.out, json.dumps(out, indent=1) + "\n")
    write_atomic(args.out.with_suffix(".md"), markdown(results, meta))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
