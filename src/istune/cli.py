"""The istune command line: `istune train | compare | eval | plot | plan | bench | analyze` (or `python -m istune`).

    istune train                              # embedded default: SmolLM2-135M, LoRA+IST on the commonsense mix
    istune train --config run.yaml --max_steps 200
    istune compare --arms all,random,ist --seeds 5 --data task:cipher   # rules side by side over seeds
    istune eval runs/istune                   # evaluate a trained output folder again
    istune eval --model smollm2-135m --harness # any model (+ --adapter DIR); lm-eval's acc/acc_norm beside
    istune plot runs/istune                   # importance heat-map and per-step selection (PNG)
    istune plan --model huggyllama/llama-7b --batch_size 4 --seq_len 256   # predicted peak GPU memory, no GPU
    istune bench memory                       # peak memory, paper Table 1 layout (meta-device accounting)
    istune bench time                         # time per step: LoRA, random sparse, IST, LISA-style
    istune bench probes --run runs/istune     # cheaper probes vs the importance ranking
    istune bench gpu --out DIR                # the GPU suite (one GPU, <= 9 min; --tiny: CPU smoke test)
    istune analyze remove-layers runs/istune  # greedy layer removal (paper Fig. 2a)
    istune analyze train-layers               # train only chosen layers (Fig. 2b)
    istune analyze sweep                      # mu and beta sweeps, sparse-tuning ablation (Tables 10, 11, 4)

`istune train` options come from dataclasses (RunArgs, ModelArgs, AdapterArgs, ISTConfig and
the Trainer's own TrainingArguments, parsed as trl does) whose help texts name the paper's
symbols; a YAML `--config` gives defaults that flags override. It runs the same under
`torchrun --nproc_per_node N -m istune train ...` and `accelerate launch -m istune train ...`.
`istune eval` reads its options from EvalArgs the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _train_parser():
    from transformers import HfArgumentParser

    from istune.adapters.methods import AdapterArgs
    from istune.config import options_dataclass
    from istune.models import ModelArgs
    from istune.recipe.training_args import RecipeTrainingArguments
    from istune.runs import RunArgs

    # ISTConfig's options: its fields and the registered rules' parameters (each declared by its rule).
    groups = (RunArgs, ModelArgs, AdapterArgs, options_dataclass(), RecipeTrainingArguments)
    shared = _shared_names(groups)
    if shared != {"seed"}:  # one name per knob; --seed alone is meant to reach two dataclasses
        raise RuntimeError(f"option names declared twice: {sorted(shared - {'seed'})}")
    # 'resolve': TrainingArguments' --seed replaces ISTConfig's; both dataclasses read it (see _parse_train).
    parser = HfArgumentParser(groups, prog="istune train", conflict_handler="resolve",
                              description="Fine-tune a causal LM with a PEFT method and IST, then evaluate it. "
                              "Every transformers.TrainingArguments option is accepted with its own meaning.")
    parser.add_argument("--config", help="YAML file of option defaults (flags given here override it).")
    parser.add_argument("--ist_seed", type=int, default=None,
                        help="Seed of istune's own RNG (selections, candidates, probe batches); default: --seed.")
    parser.add_argument("--rules_from", action="append", default=None, metavar="FILE_OR_MODULE",
                        help="A .py file or a module that registers selection rules of your own "
                        "(istune.core.selection.register_rule), imported first: their names become --strategy values "
                        "and their parameters options. Repeat it for several.")
    return parser


def import_rules(sources: Sequence[str]) -> None:
    """Import each of ``sources`` (a .py file or a module name) for the rules it registers.

    Raises:
        ValueError: a source that is neither a file nor an importable module, naming it and the fix.
    """
    import importlib
    import importlib.util

    for source in sources:
        path = Path(source)
        if source.endswith(".py"):
            if not path.is_file():
                raise ValueError(f"--rules_from={source!r}: no such file; give the .py file that calls register_rule, "
                                 "or an importable module name.")
            name = f"istune_rules_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(source)
            except ModuleNotFoundError as error:
                raise ValueError(f"--rules_from={source!r}: no module of that name ({error}); give a .py file path "
                                 "or a module on the Python path.") from None


def _rules_from(argv: Sequence[str], yaml_values: dict) -> list[str]:
    """The ``--rules_from`` sources of ``argv`` and of the YAML ``rules_from`` key (a string or a list)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--rules_from", action="append", default=[])
    given = yaml_values.get("rules_from") or []
    return [*([given] if isinstance(given, str) else list(given)), *pre.parse_known_args(argv)[0].rules_from]


def _shared_names(groups) -> set[str]:
    import dataclasses

    seen, shared = set(), set()
    for group in groups:
        names = {f.name for f in dataclasses.fields(group) if f.init}
        shared |= seen & names
        seen |= names
    return shared


def _parse_train(argv: Sequence[str], other_keys: Sequence[str] = ()):
    """(run, model_args, adapter, ist, training) from flags over a YAML --config (whose ``other_keys`` belong to
    another parser and are skipped)."""
    import dataclasses

    config_path, values = _read_config(argv)
    import_rules(_rules_from(argv, values))
    parser = _train_parser()  # after the rules are registered: their parameters are options
    values = {key: value for key, value in values.items() if key not in other_keys}
    _config_defaults(parser, "train", config_path, values)
    namespace, extra = parser.parse_known_args(list(argv))
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    options = vars(namespace)  # each dataclass takes its fields; ISTConfig and TrainingArguments both read 'seed'
    _save_strategy_from_save_steps(options, given=set(values) | _flags_given(argv))
    run, model_args, adapter, ist_options, training = (
        group(**{f.name: options[f.name] for f in dataclasses.fields(group) if f.init and f.name in options})
        for group in parser.dataclass_types)
    ist = ist_options.to_config()
    if namespace.ist_seed is not None:
        ist = dataclasses.replace(ist, seed=namespace.ist_seed)
    return run, model_args, adapter, ist, training


def _read_config(argv: Sequence[str]) -> tuple[str | None, dict]:
    """The ``--config`` file named in ``argv`` and its option values (None and {} without one)."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    if not config_path:
        return None, {}
    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"--config={config_path!r}: no such file.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config={config_path!r}: expected a mapping of option names to values.")
    return config_path, values


def _config_defaults(parser: argparse.ArgumentParser, command: str, config_path: str | None, values: dict) -> None:
    """Make the YAML ``values`` ``parser``'s defaults (flags given override them); refuse a key it does not know."""
    from istune.option_checks import did_you_mean

    known = {action.dest for action in parser._actions} - {"help", "config"}
    for key in values:
        if key not in known:
            raise ValueError(f"--config={config_path!r}: unknown option {key!r}; {did_you_mean(key, known)}"
                             f"`istune {command} --help` lists every option.")
    parser.set_defaults(**values)


def _flags_given(argv: Sequence[str]) -> set[str]:
    """The option names written on the command line (``--name value`` or ``--name=value``)."""
    return {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}


def _save_strategy_from_save_steps(values: dict, given: set[str]) -> None:
    """``--save_steps K`` alone means a checkpoint every K steps, as in transformers (sets ``values``' strategy).

    istune's default save strategy is 'no' (the main job keeps only its final adapters), so without this a
    ``--save_steps`` would be silently ignored. A save strategy given beside it that cannot use it is refused.
    """
    if "save_steps" not in given:
        return
    steps, strategy = values["save_steps"], str(getattr(values["save_strategy"], "value", values["save_strategy"]))
    if "save_strategy" not in given:
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"istune train: --save_steps {steps:g} given: saving a checkpoint every {steps:g} steps "
                  "(--save_strategy steps).", file=sys.stderr)
        values["save_strategy"] = "steps"
    elif strategy in ("no", "epoch"):
        raise ValueError(f"--save_steps={steps:g} has no effect with --save_strategy={strategy}: give "
                         "--save_strategy steps to save every K steps, or drop --save_steps.")


# Lines other libraries log on import that ask the user for nothing, at the top of every command: bitsandbytes
# (imported by peft) on CPUs with AVX512-BF16 when the optional `kernels` package is absent, before it uses its own
# CPU kernel; DeepSpeed (imported by transformers' Trainer when installed) on a machine without a GPU.
IMPORT_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "DeepSpeed": "Setting accelerator to CPU",
}


def _not_an_import_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(IMPORT_NOTICES.get(record.name, "\0"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in IMPORT_NOTICES:
        if _not_an_import_notice not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_not_an_import_notice)
    commands = {"train": _train, "compare": _compare, "eval": _eval, "plot": _plot, "plan": _plan, "bench": _bench,
                "analyze": _analyze}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nistune: unknown command {argv[0]!r}; use one of {', '.join(commands)}", file=sys.stderr)
            return 2
        return 0
    try:
        return commands[argv[0]](argv[1:]) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"istune {argv[0]}: error: {error}", file=sys.stderr)
        return 2


def _train(argv: Sequence[str]) -> int:
    import time

    from istune.recipe.train import train

    started = time.time()
    run, model_args, adapter, ist, training = _parse_train(argv)
    train(run, adapter, ist, training, model_args)
    if training.process_index == 0:
        print(f"istune train: done in {time.time() - started:.0f} s; output in {training.output_dir}")
    return 0


COMPARE_KEYS = ("arms", "seeds", "out", "effect", "quarters_from")  # `istune compare`'s own options (also YAML keys)


def _parse_compare(argv: Sequence[str]):
    """(compare's own options, and unless --report_only (arms, seeds, run, model_args, adapter, ist, training))."""
    import dataclasses

    parser = argparse.ArgumentParser(
        prog="istune compare", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Selection rules side by side over seeds, on any model and data `istune train` takes: each "
        "(arm, seed) is an `istune train` run with the options given after these (every `istune train` option "
        "is accepted); at one seed every arm gets the same data, order and adapter initialisation. Resumes run "
        "by run; refuses runs made with other options.",
        epilog="example:\n  istune compare --arms all,random,ist --seeds 5 --data task:cipher --max_steps 300 "
               "--per_device_train_batch_size 16 --learning_rate 2e-3 --train_samples 4800 --eval_limit 300\n"
               "arms: a rule (all, random, ist, lisa, badam, owlore, gradnorm, probe-once, fixed or one you "
               "registered) with optional :field=value (ist:probe_interval=2), quarter:1..quarter:4 (a fixed quarter "
               "of the layers, bottom to top), layers:A-B (fixed layers A to B).")
    parser.add_argument("--arms", default="all,random,ist", help="Comma-separated arms (default all,random,ist).")
    parser.add_argument("--seeds", default="5", help="A count (5: seeds 1-5) or a list (1,2,3); at least 2.")
    parser.add_argument("--out", default="runs/compare", help="Folder of the runs and the report.")
    parser.add_argument("--effect", type=float, default=0.05,
                        help="A difference in accuracy (0.05: 5 pp) for the report's seeds-needed column.")
    parser.add_argument("--report_only", action="store_true", help="Rebuild the report from the saved runs only.")
    parser.add_argument("--quarters_from", help="Another comparison's folder whose quarter:1..4 arms give the layers' "
                        "value for the report's mechanism section (e.g. a pilot on other seeds); default: these runs.")
    parser.add_argument("--config", help="YAML file of option defaults: `istune train` options and arms, seeds, "
                        "out, effect (flags given here override it).")
    from istune import rule_catalog

    own, _ = parser.parse_known_args(argv)
    values = {}
    if own.config and Path(own.config).is_file():  # the compare keys of the YAML are this parser's defaults
        import yaml

        values = yaml.safe_load(Path(own.config).read_text()) or {}
    import_rules(_rules_from(argv, values if isinstance(values, dict) else {}))
    parameters = rule_catalog.parameters()
    for name in parameters:  # each for the arms whose rule takes it (not for the others)
        rules = ", ".join(rule_catalog.rules_taking(name))
        parser.add_argument(f"--{name}", help=f"A rule parameter ({rules}): set for every arm whose rule takes it; "
                            "NAME:field=value in --arms sets it for one arm.")
    if isinstance(values, dict) and values:
        text = {key: ",".join(map(str, value)) if isinstance(value, list) else str(value)
                for key, value in values.items() if key in ("arms", "seeds", "out", "quarters_from")}
        parser.set_defaults(**text, **({"effect": values["effect"]} if "effect" in values else {}),
                            **{key: str(values[key]) for key in parameters if key in values})
    own, rest = parser.parse_known_args(argv)
    if own.config:
        rest = [*rest, "--config", own.config]
    if not 0 < own.effect < 1:
        raise ValueError(f"--effect={own.effect!r} must be an accuracy difference in (0, 1), e.g. 0.05 for 5 pp.")
    if own.report_only:
        return own, None
    from istune.recipe.compare import model_layer_count, parse_arms, parse_seeds

    given = _flags_given(rest)
    if "output_dir" in given:
        raise ValueError("--output_dir: istune compare puts each run in <--out>/runs/<arm>-seed<k>; give --out.")
    if "seed" in given or "ist_seed" in given:
        raise ValueError("--seed: istune compare runs every arm at each of --seeds; give --seeds instead.")
    seeds = parse_seeds(own.seeds)
    run, model_args, adapter, ist, training = _parse_train(rest, other_keys=(*COMPARE_KEYS, *parameters))
    if "curve_every" not in given and not run.curve_every:
        steps = training.max_steps if training.max_steps > 0 else 10
        run = dataclasses.replace(run, curve_every=max(1, steps // 10))
    quarters = any(arm.split(":")[0] in ("quarter", "layers") for arm in own.arms.split(","))
    rule_values = {name: getattr(own, name) for name in parameters if getattr(own, name) is not None}
    counted = quarters and ist.towers == "train"  # with "select", N_L is known once the model is built
    arms = parse_arms(own.arms, model_layer_count(run.model) if counted else None, rule_values, ist.towers)
    return own, (arms, seeds, run, model_args, adapter, ist, training)


def _compare(argv: Sequence[str]) -> int:
    from istune.analysis.comparison import write_report

    own, plan = _parse_compare(argv)
    out = Path(own.out)
    if plan is not None:
        from istune.recipe.compare import compare

        arms, seeds, *options = plan
        compare(arms, seeds, out, *options)
    print(write_report(out, own.effect, own.quarters_from))
    print(f"istune compare: report in {out / 'results.md'}, curves in {out / 'curves.png'}")
    return 0


def _eval_parser():
    from transformers import HfArgumentParser

    from istune.recipe.evaluate import EvalArgs

    parser = HfArgumentParser(
        EvalArgs, prog="istune eval", formatter_class=argparse.RawDescriptionHelpFormatter,  # help texts say defaults
        description="Evaluate a run folder again, or any model (with or without an adapter) on the commonsense tasks.",
        epilog="examples:\n  istune eval runs/istune\n  istune eval --model smollm2-135m --eval_limit 50 --harness\n"
               "  istune eval --model smollm2-135m --adapter runs/istune/adapter --output eval.json")
    parser.add_argument("run_dir", nargs="?", help="Output folder of `istune train` (or use --model).")
    parser.add_argument("--config", help="YAML file of option defaults (flags given here override it).")
    return parser


def _parse_eval(argv: Sequence[str]):
    """(run folder or None, EvalArgs) from flags over a YAML --config; exactly one of a run folder and
    --model/--adapter."""
    import dataclasses

    from istune.recipe.evaluate import EvalArgs

    config_path, values = _read_config(argv)
    parser = _eval_parser()
    _config_defaults(parser, "eval", config_path, values)
    namespace = parser.parse_args(_bool_flags_before_positional(parser, argv))
    args = EvalArgs(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(EvalArgs)})
    if (namespace.run_dir is None) == (args.model is None and args.adapter is None):
        parser.error("give either a run folder or --model/--adapter, not both and not neither")
    return namespace.run_dir, args


def _bool_flags_before_positional(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with ``true`` after a bare boolean flag followed by a positional (``--harness RUN_DIR``).

    HfArgumentParser's boolean options take an optional value (``--harness`` or ``--harness false``), so argparse
    would read the positional after one as that value.
    """
    flags = {option for action in parser._actions if action.nargs == "?" and action.const is True
             for option in action.option_strings}
    words = {"true", "false", "yes", "no", "y", "n", "t", "f", "1", "0"}
    out = []
    for arg, following in zip(argv, [*argv[1:], None]):
        out.append(arg)
        if arg in flags and following is not None and not following.startswith("-") and following.lower() not in words:
            out.append("true")
    return out


def _eval(argv: Sequence[str]) -> int:
    run_dir, args = _parse_eval(argv)
    if run_dir is not None:
        from istune.recipe.evaluate import evaluate_run

        evaluate_run(run_dir, tasks=args.eval_tasks, limit=args.eval_limit, method=args.eval_method,
                     batch_size=args.eval_batch_size, output=args.output, harness=args.harness,
                     generation_batch_size=args.generation_batch_size)
        return 0
    from istune.recipe.evaluate import evaluate_pretrained

    evaluate_pretrained(args)
    return 0


def _plot(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="istune plot", description="Plot layer importance over training (paper Fig. 4) and the selections.")
    parser.add_argument("run_dir", help="Output folder of a run (holds ist_log.jsonl), or the log file.")
    parser.add_argument("--out_dir", default=None, help="Where the PNGs go; default: the run folder.")
    args = parser.parse_args(argv)
    from istune.recipe.plot import plot_run

    for path in plot_run(args.run_dir, args.out_dir):
        print(f"istune plot: wrote {path}")
    return 0


def _plan(argv: Sequence[str]) -> int:
    from istune.bench.plan import main as plan_main

    return plan_main(list(argv)) or 0


BENCHMARKS = {  # istune bench <name>: module in istune.bench with main(argv)
    "memory": "memory_table",
    "time": "timing",
    "frontier": "frontier",
    "probes": "probes",
    "gpu": "gpu_suite",
}


def _bench(argv: Sequence[str]) -> int:
    import importlib

    if not argv or argv[0] not in BENCHMARKS:
        print("usage: istune bench {" + ",".join(BENCHMARKS) + "} [options]   (--help after a name for its options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"istune.bench.{BENCHMARKS[argv[0]]}")
    return module.main(list(argv[1:])) or 0


def _analyze(argv: Sequence[str]) -> int:
    from istune.analysis.cli import main as analyze_main
    from istune.recipe.train import train_run

    return analyze_main(list(argv), train=train_run) or 0


if __name__ == "__main__":
    sys.exit(main())
