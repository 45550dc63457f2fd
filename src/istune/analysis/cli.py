"""`istune analyze remove-layers | train-layers | sweep`: the paper's analyses from the command line.

    istune analyze remove-layers runs/istune                     # Figure 2(a) on a trained run
    istune analyze train-layers --ranking runs/istune/layer_removal/layer_removal.json   # Figure 2(b)
    istune analyze sweep --out runs/analysis/sweep               # Tables 10, 11, 4 (resumable)
    istune analyze reproducibility --run runs/istune --configs "mu=10;mu=100" --seeds 1,2,3 --updates 150

Bad input raises ValueError naming the option, the value and the fix, before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from istune.analysis.training_runs import TrainFn, add_size_options, size_from_options
from istune.option_checks import parse_list


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istune analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{remove-layers,train-layers,sweep,reproducibility}")

    remove = commands.add_parser("remove-layers", help="Figure 2(a): remove trained adapters layer by layer.",
                                 description="Remove a trained run's adapters one layer at a time (β = 0, eq. 8) in "
                                 "several orders; record held-out loss and perplexity after each removal.")
    remove.add_argument("run_dir",
                        help="Output folder of a finished `istune train` run (holds results.json and adapter/).")
    remove.add_argument("--out_dir", default=None,
                        help="Where layer_removal.json and .png go. Default: RUN_DIR/layer_removal.")
    remove.add_argument("--orders", default=None,
                        help="Comma-separated removal orders: importance_low_first, importance_high_first (by the "
                        "run's learned importance I; IST runs only), greedy_least, greedy_most (at each step the "
                        "layer whose removal raises the loss least / most), random. Default: all that apply.")
    remove.add_argument("--max_removed", type=int, default=None,
                        help="Stop each order after this many layers (greedy orders cost about N_L x this many "
                        "evaluations). Default: all N_L layers.")
    remove.add_argument("--heldout_samples", type=int, default=None,
                        help="Score only the first this many of the run's held-out examples (cheaper). Default: all.")
    remove.add_argument("--seed", type=int, default=0, help="Seed of the random order. Default: 0.")
    remove.add_argument("--metric", default="perplexity", choices=["perplexity", "loss"],
                        help="What the plot shows (the JSON has both). Default: perplexity, as in the paper.")
    remove.add_argument("--batch_size", type=int, default=8, help="Held-out examples per forward pass. Default: 8.")

    layers = commands.add_parser("train-layers", help="Figure 2(b): fine-tune only chosen layers.",
                                 description="Fine-tune with only chosen layers trainable (strategy 'fixed'): the k "
                                 "most and least important layers by a ranking, all layers, or explicit sets.")
    layers.add_argument("--out", default="runs/analysis/layer_training",
                        help="Folder of the runs (runs/NAME.json, resumable) and of layer_training.json and .png.")
    layers.add_argument("--ranking", default=None,
                        help="Layer ranking: a layer_removal.json from remove-layers (its greedy ranking) or an IST "
                        "run folder (its learned importance I). Needed by --kinds top and bottom.")
    layers.add_argument("--kinds", default="top,bottom,all",
                        help="Which sets: top (k most important), bottom (k least important), all (every layer). "
                        "Default: top,bottom,all.")
    layers.add_argument("--k_values", default="1,2,4,8",
                        help="Comma-separated k for top and bottom. Default: 1,2,4,8.")
    layers.add_argument("--layer_sets", default=None,
                        help="Extra explicit sets of layer positions, sets separated by semicolons: e.g. \"0,1;29\".")
    layers.add_argument("--seed", type=int, default=42,
                        help="Seed of data sample, order and adapter init. Default: 42.")
    layers.add_argument("--keep_adapters", action="store_true",
                        help="Keep each run's folder (adapters, IST log) as runs/NAME/; by default only its record "
                        "is kept.")
    add_size_options(layers)

    sweep = commands.add_parser("sweep", help="Tables 10, 11, 4: μ, β and the sparse-tuning ablation.",
                                description="Train short runs over μ values, β values and strategies (all, random, "
                                "IST at several N_u); resumable run by run; writes sweep.json, sweep.md and "
                                "sweep.png.")
    sweep.add_argument("--out", default="runs/analysis/sweep",
                       help="Folder of the runs (runs/NAME.json, resumable) and of sweep.json, .md and .png.")
    sweep.add_argument("--parts", default="mu,beta,ablation",
                       help="Comma-separated parts: mu (Table 10), beta (Table 11), ablation (Table 4). "
                       "Default: all three.")
    sweep.add_argument("--mu_values", default="0.1,1,10,100,1000",
                       help="μ values of the mu part (importance learning rate). "
                       "Default: the paper's 0.1,1,10,100,1000.")
    sweep.add_argument("--beta_values", default="0,0.1,0.25,0.5",
                       help="β values of the beta part (response suppression factor, in [0, 1]). "
                       "Default: the paper's 0,0.1,0.25,0.5.")
    sweep.add_argument("--update_layers", type=int, default=8,
                       help="N_u, layers trained per step, in the mu and beta parts. "
                       "Default: 8 (the paper's 25 percent of 32).")
    sweep.add_argument("--ablation_update_layers", default="4,8",
                       help="N_u values of the ablation's random and IST runs. Default: the paper's 4,8.")
    sweep.add_argument("--mu", type=float, default=10.0, help="μ where it is not swept. Default: 10 (commonsense).")
    sweep.add_argument("--beta", type=float, default=0.25, help="β where it is not swept. Default: 0.25.")
    sweep.add_argument("--probe_interval", type=int, default=10,
                       help="T_c, steps between importance updates. Default: 10.")
    sweep.add_argument("--seeds", default="42",
                       help="Comma-separated seeds; every run is repeated per seed. Default: 42.")
    sweep.add_argument("--keep_adapters", action="store_true",
                       help="Keep each run's folder (adapters, IST log) as runs/NAME/; by default only its record "
                       "is kept.")
    add_size_options(sweep)

    repro = commands.add_parser("reproducibility",
                                help="Do seeds agree on the learned importance, and after how many updates?",
                                description="Compare the importance rankings that several seeds learn, as importance "
                                "updates accumulate, against a permutation baseline. Frozen adapters of a run "
                                "(--run, resumable) or the logs of runs trained with different seeds (--logs).")
    repro.add_argument("--run", default=None,
                       help="Output folder of an `istune train` run whose adapters stay frozen.")
    repro.add_argument("--configs", default="mu=10;mu=100",
                       help="With --run: ISTConfig overrides, one group per setting, groups separated by semicolons, "
                       "fields by commas: e.g. \"mu=10;mu=100;reward_scale=spread,mu=0.1\". Default: mu=10;mu=100.")
    repro.add_argument("--seeds", default="1,2,3",
                       help="With --run: comma-separated seeds (at least two). Default: 1,2,3.")
    repro.add_argument("--updates", type=int, default=150,
                       help="With --run: importance updates per seed. Default: 150.")
    repro.add_argument("--logs", default=None,
                       help="Instead of --run: LABEL:RUN,RUN[,RUN] groups separated by semicolons, each RUN an "
                       "`istune train` output folder (its ist_log.jsonl) trained with another seed.")
    repro.add_argument("--every", type=int, default=10, help="Compare after every this many updates. Default: 10.")
    repro.add_argument("--top_k", type=int, default=None,
                       help="Size of the compared top sets. Default: N_u of ISTConfig's defaults (25 percent of N_L).")
    repro.add_argument("--out", default="benchmarks/results/reproducibility",
                       help="Folder of runs/ (resumable) and reproducibility.json, .md and .png.")
    return parser


def main(argv: Sequence[str] | None = None, train: TrainFn | None = None) -> int:
    """Run one analysis. Returns 0; bad input raises ValueError (with the option, value and fix).

    Args:
        train: how train-layers and sweep train a run (``istune.cli`` passes the recipe's
            :func:`~istune.recipe.train.train_run`; the analyses sit below the recipe).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    options = _parser().parse_args(argv)
    given = argv[1:]  # the options after the subcommand, recorded with each result
    if options.command == "remove-layers":
        from istune.analysis.removal import format_removal, remove_layers

        orders = parse_list("orders", options.orders, str) if options.orders is not None else None
        record = remove_layers(options.run_dir, options.out_dir, orders, options.max_removed, options.heldout_samples,
                               options.seed, options.metric, options.batch_size, argv=given)
        print(format_removal(record, options.metric))
    elif options.command == "train-layers":
        from istune.analysis.layer_training import format_layer_sets, parse_layer_sets, train_layer_sets

        kinds = parse_list("kinds", options.kinds, str)
        k_values = parse_list("k_values", options.k_values, int)
        result = train_layer_sets(options.out, size_from_options(options), options.ranking, kinds, k_values,
                                  parse_layer_sets(options.layer_sets), options.seed, options.keep_adapters,
                                  argv=given, train=_needed(train))
        print(format_layer_sets(result))
    elif options.command == "reproducibility":
        _reproducibility(options, argv)
    else:
        from istune.analysis.sweep import format_tables, run_sweep

        result = run_sweep(
            options.out, size_from_options(options), parse_list("parts", options.parts, str),
            train=_needed(train), keep_adapters=options.keep_adapters, argv=given,
            mu_values=parse_list("mu_values", options.mu_values, float),
            beta_values=parse_list("beta_values", options.beta_values, float),
            update_layers=options.update_layers,
            ablation_update_layers=parse_list("ablation_update_layers", options.ablation_update_layers, int),
            mu=options.mu, beta=options.beta, probe_interval=options.probe_interval,
            seeds=parse_list("seeds", options.seeds, int))
        print(format_tables(result["parts"]))
    return 0


def _needed(train: TrainFn | None) -> TrainFn:
    if train is None:
        raise ValueError("this analysis trains runs: start it as `istune analyze ...`, or pass "
                         "train=istune.recipe.train.train_run to istune.analysis.cli.main.")
    return train


def _reproducibility(options, argv: list[str]) -> None:
    from pathlib import Path

    from istune.analysis import reproducibility
    from istune.bench.timing import parse_ist_fields
    from istune.config import ISTConfig
    from istune.io import run_metadata
    from istune.option_checks import require_at_least_one

    require_at_least_one(options, ("updates", "every"))
    if (options.run is None) == (options.logs is None):
        raise ValueError("istune analyze reproducibility: give either --run (frozen adapters) "
                         "or --logs (training runs).")
    if options.top_k is not None and options.top_k < 1:
        raise ValueError(f"--top_k={options.top_k} must be at least 1 (or leave it unset for N_u).")
    out = Path(options.out)
    if options.logs is not None:
        groups = [reproducibility.Group(label, [reproducibility.log_trajectory(folder) for folder in folders])
                  for label, folders in reproducibility.parse_log_groups(options.logs)]
    else:
        seeds = parse_list("seeds", options.seeds, int)
        if len(seeds) < 2:
            raise ValueError(f"--seeds={options.seeds!r}: give at least two seeds to compare.")
        parts = [part.strip() for part in options.configs.split(";") if part.strip()]
        configs = [(part, parse_ist_fields(part)) for part in parts]
        if not configs:
            raise ValueError(f"--configs={options.configs!r}: give at least one setting, e.g. mu=10.")
        groups = reproducibility.frozen_trajectories(options.run, configs, seeds, options.updates, out)
    num_layers = len(groups[0].trajectories[0][0])
    k = options.top_k or ISTConfig().resolve(num_layers).update_layers
    result = reproducibility.study(groups, k, options.every)
    repo = Path(__file__).resolve().parents[3]
    reproducibility.write_study(result, out, run_metadata("-m istune analyze", argv, repo))
    print(reproducibility.format_study(result))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        print(f"istune analyze: error: {error}", file=sys.stderr)
        sys.exit(2)
