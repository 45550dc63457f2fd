"""`istune plan`: predict a training run's peak GPU memory from the model's config alone (no weights, no GPU).

    istune plan --model huggyllama/llama-7b --batch_size 4 --seq_len 256 --dtype bfloat16
    istune plan --model meta-llama/Meta-Llama-3-8B --batch_size 1 --seq_len 1024 --load_in_4bit
    istune plan --model path/to/model_folder --batch_size 8 --seq_len 512 --json plan.json
    istune plan --recipe configs/paper/commonsense-llama7b-lora-ist.yaml [--fill]   # the row a recipe file runs

The command line of :mod:`istune.planning.planner`, which says how it predicts and what it counts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from istune.bench.records import run_metadata, write_record
from istune.planning.planner import (
    DTYPES,
    FOOTNOTE,
    PLAN_KEYS,
    PLAN_METHODS,
    PlanSettings,
    check_layer_counts,
    fill_comment,
    header,
    plan,
    predict_recipe,
    table,
    validate_settings,
)
from istune.planning.rows import ROWS, stored_row, table_names

__all__ = ["build_parser", "main"]

# The names --rows lists (the keys istune plan took before one key per configuration; the keys work too).
ROW_KEYS = ("lora", "lora+gc", "ist", "ist+recompute", "ist+gc", "ist:drop", "ist+recompute:drop", "ist+gc:drop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istune plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id (local HF cache or built-in shape), local folder with config.json, "
                        "or 'smollm2-135m'")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per device per step")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (cutoff_len)")
    parser.add_argument("--dtype", default="bfloat16", help=f"weight dtype: {', '.join(DTYPES)} (4-bit: the "
                        "compute dtype)")
    parser.add_argument("--method", default="lora", help=f"PEFT method: {', '.join(PLAN_METHODS)}")
    parser.add_argument("--rank", type=int, default=32, help="LoRA/DoRA rank r (the paper: 32)")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (the paper: 0.05)")
    parser.add_argument("--target_modules", default=None,
                        help="comma list of modules to adapt (default: istune's: LoRA on q/k/v/up/down for LLaMA)")
    parser.add_argument("--load_in_4bit", action="store_true", help="QLoRA: nf4 weights (bitsandbytes) and "
                        "peft's prepare_model_for_kbit_training")
    parser.add_argument("--double_quant", action=argparse.BooleanOptionalAction, default=True,
                        help="4-bit: quantize the quantization constants too (QLoRA's recipe; default yes)")
    parser.add_argument("--attn_implementation", default="sdpa", help="sdpa (fused kernel; default) or eager")
    parser.add_argument("--update_fraction", type=float, default=None, help="N_u / N_L for the IST rows "
                        "(default 0.25)")
    parser.add_argument("--update_layers", type=int, default=None, help="N_u as a layer count")
    parser.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma list of rows, from: {', '.join(ROW_KEYS)}")
    parser.add_argument("--stored_layers", type=int, default=None,
                        help="also plan IST with ISTConfig.stored_layers = M (M of the layers that run backward keep "
                        "their activations, the others are recomputed), with and without gradient checkpointing")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the predictions to this JSON file, and the table as Markdown beside it")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="predict the run a recipe YAML describes (its model, batch, cutoff_len, method, "
                        "load_in_4bit, gradient_checkpointing, dtype/bf16, strategy, IST options) and print its "
                        "comment line")
    parser.add_argument("--fill", action="store_true", help="with --recipe: write the comment line into the file")
    return parser


def main(argv: list[str] | None = None) -> int:
    from istune.config import ISTConfig
    from istune.option_checks import parse_list
    from istune.planning.shapes import resolve_model_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.recipe is not None:
        result, comment = predict_recipe(args.recipe)
        print(f"{result['source']}\n{comment}")
        if args.fill:
            fill_comment(args.recipe, comment)
            print(f"wrote the line into {args.recipe}")
        return 0
    if args.fill:
        raise ValueError("--fill needs --recipe <file>: it writes the predicted line into that recipe file.")
    if not args.model:
        raise ValueError("--model is required: a hub id, a local folder with config.json, or 'smollm2-135m'.")
    names = table_names(PLAN_KEYS)
    keys = {names[name] for name in parse_list("rows", args.rows, allowed=names)}
    targets = tuple(parse_list("target_modules", args.target_modules)) if args.target_modules else None
    settings = PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, method=args.method,
                            rank=args.rank, lora_dropout=args.lora_dropout, target_modules=targets,
                            load_in_4bit=args.load_in_4bit, double_quant=args.double_quant,
                            attention=args.attn_implementation, update_fraction=args.update_fraction,
                            update_layers=args.update_layers)
    validate_settings(settings)
    if args.json is not None and args.json.suffix != ".json":
        raise ValueError(f"--json={str(args.json)!r} must end in .json.")
    config, source = resolve_model_config(args.model)
    check_layer_counts(config, settings)
    print(f"istune plan: {args.model}: predicting {len(keys)} rows on the meta device ...", file=sys.stderr)
    planned = tuple(ROWS[key] for key in PLAN_KEYS if key in keys)
    if args.stored_layers is not None:
        ISTConfig(stored_layers=args.stored_layers)  # a bad value: the named error, before any model is built
        planned += (stored_row(args.stored_layers, False), stored_row(args.stored_layers, True))
    results = plan(config, settings, planned, progress=True)
    text = header(source, config, settings, results) + "\n\n" + table(results) + "\n\n" + FOOTNOTE
    print(text)
    if args.json is not None:
        meta = run_metadata("-m istune plan", argv)
        write_record(args.json, {"meta": meta, "model": args.model, "source": source, "settings": asdict(settings),
                                 "rows": results}, f"# istune plan: {args.model}\n\nCommand: `{meta['command']}`  \n"
                     f"Date: {meta['date']}; commit {meta['commit']}\n\n{text}\n", indent=1)
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
