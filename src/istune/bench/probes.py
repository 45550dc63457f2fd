"""Probe cost vs the quality of the learned layer ranking: can IST's probes be made cheaper?

    istune bench probes                            # SmolLM2-135M + LoRA trained briefly on the commonsense mix
    istune bench probes --run runs/istune          # the adapters of an `istune train` run folder
    istune bench probes --updates 10 --variants batch1,nc2 --train_steps 4    # a quick look

The adapters are trained (or loaded) and then FROZEN; only ``--updates`` importance updates run
(``SparseTuner.update_importance``, from zero importance). The reference is the full probe (the training
batch, full length, N_c of the config) with ``--seed``; each variant (:data:`VARIANTS`: ``full`` = the
reference with another seed, the noise floor; smaller batches, truncated tokens, fewer candidates) runs
with each of ``--seeds``. Agreement with the reference: Spearman correlation of the importance vectors and
the overlap of their top-N_u sets. Cost: seconds per update (noisy) and probe tokens per update (exact).

Not implemented: all N_c candidates in one forward (a ``(N_c*B, 1, 1)`` β tensor as LoRA's ``scaling``); it
would save launch overhead on a GPU, not arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from istune.config import ISTConfig

DEFAULT_OUT = "benchmarks/results/probe_cost"
IGNORE_INDEX = -100  # labels the loss skips (as istune.data.IGNORE_INDEX)


@dataclass(frozen=True)
class Variant:
    """How one run probes, relative to the full probe (None: as the full probe)."""

    key: str
    label: str
    probe_batch_size: int | None = None  # rows of each probe batch kept (its first ones)
    length_fraction: float | None = None  # keep the last ceil(f x padded length) tokens of each row
    max_length: int | None = None  # keep the last max_length tokens of each row
    num_probes: int | None = None  # N_c

    def shrink(self, batch: dict) -> dict:
        """The probe batch this variant sees, cut from the full probe batch."""
        if self.probe_batch_size is not None:
            batch = {key: value[: self.probe_batch_size] for key, value in batch.items()}
        length = batch["input_ids"].shape[1]
        if self.length_fraction is not None:
            length = math.ceil(self.length_fraction * length)
        if self.max_length is not None:
            length = min(length, self.max_length)
        return truncate_batch(batch, length) if length < batch["input_ids"].shape[1] else batch


VARIANTS = {
    "full": Variant("full", "full probe, other seed (noise floor)"),
    "batch2": Variant("batch2", "probe batch 2", probe_batch_size=2),
    "batch1": Variant("batch1", "probe batch 1", probe_batch_size=1),
    "half": Variant("half", "last half of the tokens", length_fraction=0.5),
    "tokens32": Variant("tokens32", "last 32 tokens", max_length=32),
    "nc2": Variant("nc2", "N_c = 2", num_probes=2),
}
REFERENCE = Variant("reference", "full probe (reference)")


def truncate_batch(batch: dict, max_length: int, pad_token_id: int = 0) -> dict:
    """Keep at most ``max_length`` (>= 1) tokens of each row of a right-padded batch (``input_ids``, ``labels``,
    optionally ``attention_mask``, each ``(B, T)``), ending at its last labelled token: answers come last, so
    the loss terms stay (with less context) when they fit. Rows are right-padded again to the longest kept
    (``pad_token_id``, attention 0, label -100). Other keys raise ValueError (their truncation is unknown)."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be at least 1 token.")
    other = sorted(set(batch) - {"input_ids", "labels", "attention_mask"})
    if other:
        raise ValueError(f"truncate_batch cannot cut {other}; give input_ids, labels and attention_mask only.")
    ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    windows = []
    for row in range(ids.shape[0]):
        labelled = torch.nonzero(labels[row] != IGNORE_INDEX).flatten()
        if labelled.numel():
            end = int(labelled[-1]) + 1
        elif mask is not None:
            end = int(mask[row].sum())
        else:
            end = ids.shape[1]
        windows.append((max(0, end - max_length), end))
    length = max(end - start for start, end in windows)
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for key, value in batch.items():
        rows = value.new_full((value.shape[0], length), fills[key])
        for row, (start, end) in enumerate(windows):
            rows[row, : end - start] = value[row, start:end]
        out[key] = rows
    return out


def probe_tokens(batch: dict) -> int:
    """Tokens one probe forward processes: rows x padded length."""
    return int(batch["input_ids"].numel())


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (smallest first); tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(a)} and {len(b)}.")
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def top_k(values: Sequence[float], k: int) -> list[int]:
    """Positions of the ``k`` largest values; ties go to the lower position."""
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """Fraction of ``a``'s top-k positions that are also in ``b``'s top-k."""
    return len(set(top_k(a, k)) & set(top_k(b, k))) / k


@dataclass
class ProbeSource:
    """Where probe batches come from: a map-style dataset of tokenized rows, its collator, the full batch size."""

    dataset: Any
    collate: Callable[[list], dict]
    batch_size: int


def importance_run(model: torch.nn.Module, config: ISTConfig, variant: Variant, seed: int, source: ProbeSource,
                   updates: int) -> dict:
    """``updates`` importance updates from zero on the frozen ``model``: importance (and its ``trajectory``, one
    per update) and costs. ``seed`` drives the candidate draws and the probe batches: variants run with the
    same seed see the same probe examples (or their first rows)."""
    from istune.core.probe import ProbeSampler
    from istune.core.tuner import SparseTuner

    tuner = SparseTuner(model, probe_config(config, seed, variant.num_probes))
    sampler = ProbeSampler(source.dataset, source.collate, source.batch_size, seed + 1)
    seconds, tokens, skipped, trajectory = [], [], 0, []
    try:
        for _ in range(updates):
            batch = variant.shrink(sampler())
            started = time.perf_counter()
            record = tuner.update_importance(batch)
            seconds.append(time.perf_counter() - started)
            tokens.append(probe_tokens(batch) * len(record["candidates"]))
            skipped += bool(record.get("skipped"))
            trajectory.append(record["importance"])
    finally:
        tuner.close()
    return {"variant": variant.key, "seed": seed, "importance": tuner.importance.tolist(), "trajectory": trajectory,
            "seconds_per_update": statistics.median(seconds), "tokens_per_update": statistics.fmean(tokens),
            "skipped_updates": skipped, "update_layers": tuner.counts.update_layers}


def probe_config(config: ISTConfig, seed: int, num_probes: int | None = None) -> ISTConfig:
    """``config`` as strategy 'ist' with ``seed`` (and N_c), minus what needs training (an optimizer, a fixed set)."""
    changes: dict[str, Any] = {"strategy": "ist", "seed": seed, "layers": None,
                               "num_probes": num_probes or config.num_probes}
    if getattr(config, "unselected_optimizer_state", "keep") != "keep":
        changes["unselected_optimizer_state"] = "keep"
    return dataclasses.replace(config, **changes)


def compare(model: torch.nn.Module, config: ISTConfig, source: ProbeSource, variants: list[Variant], seeds: list[int],
            reference_seed: int, updates: int, progress: Callable[[str], None] = print) -> dict:
    """The reference run, every variant at every comparison seed, and their agreement with the reference."""
    reference = importance_run(model, config, REFERENCE, reference_seed, source, updates)
    reference.pop("trajectory")  # only the final rankings are compared here
    progress(f"reference: {reference['seconds_per_update']:.2f} s/update")
    k = reference["update_layers"]
    rows = []
    for variant in variants:
        runs = []
        for seed in seeds:
            run = importance_run(model, config, variant, seed, source, updates)
            run.pop("trajectory")
            ranked = len(set(run["importance"])) > 1  # a constant vector (e.g. N_c = 1) ranks nothing
            rho = spearman(reference["importance"], run["importance"])
            run["spearman"] = None if math.isnan(rho) else rho
            run["top_overlap"] = top_k_overlap(reference["importance"], run["importance"], k) if ranked else None
            runs.append(run)
            progress(f"{variant.key} seed {seed}: spearman {_show(run['spearman'], '.3f')}, top-{k} overlap "
                     f"{_show(run['top_overlap'], '.2f')}, {run['seconds_per_update']:.2f} s/update")
        rows.append({
            "variant": variant.key, "label": variant.label, "runs": runs,
            "spearman": _mean([r["spearman"] for r in runs]),
            "top_overlap": _mean([r["top_overlap"] for r in runs]),
            "seconds_per_update": statistics.median(r["seconds_per_update"] for r in runs),
            "tokens_per_update": statistics.fmean(r["tokens_per_update"] for r in runs),
        })
    for row in rows:
        row["relative_tokens"] = row["tokens_per_update"] / reference["tokens_per_update"]
        row["relative_seconds"] = row["seconds_per_update"] / reference["seconds_per_update"]
    return {"reference": reference, "update_layers": k, "rows": rows}


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values; None when none is (no ranking to compare)."""
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


def _show(value: float | None, spec: str) -> str:
    return "n/a (constant)" if value is None else format(value, spec)


def make_adapters_trainable(model: torch.nn.Module) -> int:
    """Turn ``requires_grad`` on for every adapter parameter (loaded adapters are frozen): SparseTuner finds its
    layers by their trainable parameters. Nothing trains: no optimizer exists, probes run without gradients."""
    from istune.core.layers import is_adapter_module

    count = 0
    for module in model.modules():
        if is_adapter_module(module):
            base = getattr(module, "base_layer", None)
            inside_base = {id(p) for p in base.parameters()} if base is not None else set()
            for parameter in module.parameters():
                if id(parameter) not in inside_base:
                    parameter.requires_grad_(True)
                    count += 1
    return count


def load_run(folder: Path, packed: bool = False) -> tuple[torch.nn.Module, ISTConfig, ProbeSource, dict]:
    """Base model + adapters of an ``istune train`` output folder, its IST config and its training data.

    ``packed``: probe batches as ``istune train`` collates them (padding-free where the model allows): the same
    losses, less work; the variants that cut batches (``truncate_batch``) need the padded default.
    """
    from istune.adapters.methods import AdapterArgs, load_adapters
    from istune.data import CausalLMCollator, InstructionDataset
    from istune.models import load_model_and_tokenizer
    from istune.runs import RunArgs, batch_layout, load_rows, saved_training_value

    results = folder / "results.json"
    if not results.is_file() or not (folder / "adapter").is_dir():
        raise ValueError(f"--run={str(folder)!r} is not the output folder of `istune train` (it needs results.json "
                         "and adapter/); train one first or leave --run out to train the embedded model briefly.")
    saved = json.loads(results.read_text())
    adapter = AdapterArgs(**saved["adapter"])
    if adapter.method == "full":
        raise ValueError(f"--run={str(folder)!r} trained whole layers (method 'full'); its initial weights W0 are not "
                         "saved, so probes cannot suppress its change. Use a run with adapters.")
    run, config = RunArgs.from_saved(saved["run"]), ISTConfig(**saved["ist"])
    base, tokenizer = load_model_and_tokenizer(run.model)
    model = load_adapters(base, folder / "adapter")
    make_adapters_trainable(model)
    train_rows, _ = load_rows(run, saved_training_value(saved, "seed"))
    dataset = InstructionDataset(train_rows, tokenizer, run.cutoff_len, run.train_on_inputs)
    batch_size = saved_training_value(saved, "per_device_train_batch_size")
    layout = batch_layout(run, model) if packed else {}
    source = ProbeSource(dataset, CausalLMCollator(tokenizer, **layout), batch_size)  # full probe = the training batch
    described = {"run": str(folder), "model": run.model, "method": adapter.method,
                 "train_steps": saved_training_value(saved, "max_steps"),
                 "training_importance": saved.get("importance")}  # what IST learned while the adapters trained
    return model, config, source, described


def train_briefly(name: str | None, steps: int, batch_size: int, cutoff_len: int, learning_rate: float,
                  seed: int, pool: int = 1000, progress: Callable[[str], None] = print):
    """LoRA (r=32, alpha 64) on ``name``, ``steps`` AdamW steps on the commonsense mix; the model, the probe
    source (a seeded sample of ``pool`` training rows, the trained ones first) and a description."""
    from istune.data import CausalLMCollator, InstructionDataset, build_commonsense_train
    from istune.planning.rows import ROWS
    from istune.planning.step import build_model, load_model_and_tokenizer, trainable

    rows = build_commonsense_train()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order[: max(pool, steps * batch_size)]]
    model, tokenizer = load_model_and_tokenizer(name)
    model = build_model(None, ROWS["lora"], model=model, seed=seed, adapter=dict(rank=32, alpha=64), total_steps=steps)
    dataset = InstructionDataset(rows, tokenizer, cutoff_len, train_on_inputs=False)
    collate = CausalLMCollator(tokenizer)
    optimizer = torch.optim.AdamW(trainable(model), lr=learning_rate)
    losses = []
    for step in range(steps):
        batch = collate([dataset[i] for i in range(step * batch_size, (step + 1) * batch_size)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress(f"train step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    model.eval()
    described = {"model": name or "smollm2-135m", "method": "lora", "train_steps": steps,
                 "train_batch_size": batch_size, "learning_rate": learning_rate, "cutoff_len": cutoff_len,
                 "train_losses": losses}
    return model, ProbeSource(dataset, collate, batch_size), described


def adapter_checksum(model: torch.nn.Module) -> float:
    """Sum of |w| over the adapter parameters: equal before and after shows nothing trained."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters() if p.requires_grad))


def markdown_table(result: dict) -> str:
    k = result["update_layers"]
    reference = result["reference"]
    lines = [f"| probe | Spearman vs reference | top-{k} overlap | probe tokens / update | s / update (contended) |",
             "|---|---:|---:|---:|---:|",
             f"| {REFERENCE.label} | 1 | 1 | {reference['tokens_per_update']:.0f} (1.00x) "
             f"| {reference['seconds_per_update']:.2f} (1.00x) |"]
    for row in result["rows"]:
        lines.append(f"| {row['label']} | {_show(row['spearman'], '.3f')} | {_show(row['top_overlap'], '.2f')} "
                     f"| {row['tokens_per_update']:.0f} ({row['relative_tokens']:.2f}x) "
                     f"| {row['seconds_per_update']:.2f} ({row['relative_seconds']:.2f}x) |")
    return "\n".join(lines)


def write_results(out: Path, meta: dict, result: dict, settings: dict) -> str:
    """Write ``out.json`` and ``out.md`` (each whole or not at all); return the table."""
    from istune.bench.records import write_record

    table = markdown_table(result)
    seeds = ", ".join(map(str, settings["seeds"]))
    write_record(out, {**meta, "settings": settings, **result}, (
        f"# Probe cost vs importance ranking\n\nCommand: `{meta['command']}`  \nCommit {meta['commit']}, "
        f"{meta['date']}, {meta['machine']}.\n\nModel: {_describe(settings['model'])}. Adapters frozen; "
        f"{settings['updates']} importance updates from zero importance per run. Reference: full probe (batch "
        f"{settings['probe_batch_size']}, full length, N_c = {settings['num_probes']}), seed "
        f"{settings['reference_seed']}; every other row: seed(s) {seeds} "
        f"(mean over seeds). The 'other seed' row is the noise floor: a variant is as good as the full probe when it "
        f"agrees with the reference about as well. Seconds per update are wall clock on a shared machine; the token "
        f"counts are exact.{_training_note(result)}\n\n{table}\n"))
    return table


def _describe(model: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in model.items()
                     if key not in ("training_importance", "train_losses"))


def _training_note(result: dict) -> str:
    rho = result["reference"].get("spearman_vs_training")
    if rho is None:
        return ""
    return (f" For context: the reference's ranking vs the importance IST learned while the adapters trained "
            f"(they moved meanwhile): Spearman {rho:.3f}.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="istune bench probes", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None,
                        help="an `istune train` output folder: its adapters, IST config and data")
    parser.add_argument("--model", default=None,
                        help="without --run: hub id or path (default the embedded SmolLM2-135M)")
    parser.add_argument("--train_steps", type=int, default=30, help="without --run: LoRA steps before freezing")
    parser.add_argument("--batch_size", type=int, default=4, help="without --run: training batch = full probe batch")
    parser.add_argument("--cutoff_len", type=int, default=256, help="without --run: tokens per example at most")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="without --run: AdamW learning rate")
    parser.add_argument("--updates", type=int, default=30, help="importance updates per run (M)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="1", help="comparison seeds, comma-separated (results are their mean)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference run (and of the data sample)")
    parser.add_argument("--ist", default=None, metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="ISTConfig fields of every run, e.g. mu=100 (default: the run's config, or ISTConfig())")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results go to OUT.json and OUT.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``istune bench probes``: compare probe variants, print the table, write ``--out``.json/.md."""
    import sys

    from istune.bench.records import run_metadata
    from istune.bench.timing import parse_ist_fields
    from istune.option_checks import parse_list, require_at_least_one

    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    require_at_least_one(opts, ("train_steps", "batch_size", "cutoff_len", "updates"))
    variants = [VARIANTS[key] for key in parse_list("variants", opts.variants, allowed=VARIANTS)]
    seeds = parse_list("seeds", opts.seeds, int)
    overrides = parse_ist_fields(opts.ist) if opts.ist else {}
    if opts.run:
        model, config, source, described = load_run(Path(opts.run))
    else:
        model, source, described = train_briefly(opts.model, opts.train_steps, opts.batch_size, opts.cutoff_len,
                                                 opts.learning_rate, opts.seed)
        config = ISTConfig()
    config = dataclasses.replace(config, **overrides)
    checksum = adapter_checksum(model)
    result = compare(model, config, source, variants, seeds, opts.seed, opts.updates,
                     progress=lambda text: print(text, flush=True))
    if adapter_checksum(model) != checksum:
        raise RuntimeError("The adapter weights changed during the importance runs; the comparison is void.")
    learned = described.get("training_importance")
    if learned and len(learned) == len(result["reference"]["importance"]):
        result["reference"]["spearman_vs_training"] = spearman(result["reference"]["importance"], learned)
    settings = {"model": described, "updates": opts.updates, "seeds": seeds, "reference_seed": opts.seed,
                "probe_batch_size": source.batch_size, "num_probes": config.num_probes, "ist": config.to_dict(),
                "threads": torch.get_num_threads()}
    table = write_results(Path(opts.out), run_metadata("-m istune bench probes", argv), result, settings)
    print(table)
    return 0
