"""``istune compare``: selection rules side by side on any model and data ``istune train`` takes, over seeds.

    istune compare --arms all,random,ist --seeds 5 --data task:cipher --max_steps 300 --curve_every 25

Each (arm, seed) run is an ``istune train`` run with the command's options, in
``<out>/runs/<arm>-seed<k>/``; an arm only changes the selection rule, so at one seed every arm
gets the same data, data order and adapter initialisation (``--seed k`` for all of them). Runs
are saved as they finish and the comparison resumes run by run: a complete run is reused, a run
whose evaluation was cut short is finished, a run cut short in training starts again. Runs
made with other options are refused, never mixed in. The report (:mod:`istune.analysis.comparison`)
is written when the runs are done.

An arm is a rule name with optional ISTConfig values, ``NAME[:field=value...]`` (``ist:probe_interval=2``,
``lisa:switch_interval=20``), a fixed quarter of the layers, ``quarter:1`` (bottom) to ``quarter:4``
(top), or fixed layers ``layers:A-B``. A rule parameter given as a flag (``--switch_interval 20``)
applies to every arm whose rule takes it; written in an arm it applies to that arm alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from istune import rule_catalog
from istune.config import ISTConfig, option_names, strategy_names
from istune.io import write_json
from istune.models import ModelArgs
from istune.recipe import run_file
from istune.recipe.job_checks import check_output_dir, run_record
from istune.runs import COMPARE_FILE, RunArgs, comparison_run_folder, quarter_layers

QUARTERS = {1: "bottom", 2: "lower-middle", 3: "upper-middle", 4: "top"}
# Trainer options that differ run to run or do not change what a run computes; every other one must match.
_PER_RUN = {"output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir", "seed",
            "data_seed", "disable_tqdm", "logging_steps", "report_to", "hub_token", "push_to_hub"}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: its name as written in ``--arms`` and the ISTConfig values it sets."""

    name: str
    values: dict[str, Any]


def parse_arms(text: str, num_layers: int | None, rule_values: dict[str, str] | None = None,
               towers: str = "train") -> list[Arm]:
    """``--arms`` -> arms, each checked (an unknown arm lists the arms; a bad value names its field).

    With ``towers="select"`` (``--towers select``) N_L counts a tower's blocks as well, known only
    once the model and its adapters are built: ``quarter:K`` is refused, and ``layers:A-B`` is checked against
    N_L when training starts, not against ``num_layers`` (the config's language layers).

    ``rule_values`` (rule parameters given as flags, ``--block_order descending``) go to every arm whose rule
    declares them, unless the arm sets its own.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--arms={text!r} names no arm; e.g. --arms all,random,ist.")
    if len(set(names)) != len(names):
        raise ValueError(f"--arms={text!r} names an arm twice; name each once.")
    return [_parse_arm(name, num_layers, rule_values or {}, towers) for name in names]


def _parse_arm(text: str, num_layers: int | None, rule_values: dict[str, str], towers: str = "train") -> Arm:
    head, *pairs = text.split(":")
    if head in ("quarter", "layers"):
        if towers == "select" and head == "quarter":
            raise ValueError(f"--arms: {text!r} with --towers select: a quarter is N_L/4 positions of the "
                             "combined list (the towers' blocks that hold adapters, then the language model's "
                             "layers), whose length is known only once the model and its adapters are built; give "
                             "the positions as layers:A-B (the tower's blocks first), or use --towers train.")
        counted = num_layers if towers == "train" else None
        return Arm(text, {"strategy": "fixed", "layers": _fixed_layers(text, head, pairs, counted)})
    if head not in strategy_names():
        raise ValueError(f"--arms: unknown arm {text!r}; the arms are {', '.join(strategy_names())} (each with "
                         "optional :field=value), quarter:1 to quarter:4 (the bottom to the top quarter of the "
                         "layers, fixed) and layers:A-B (fixed layers A to B).")
    values: dict[str, Any] = {"strategy": head}
    names = option_names()
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if key not in names or key in ("strategy", "seed") or not sep:
            raise ValueError(f"--arms: {text!r}: {pair!r} is not an IST option=value; e.g. "
                             f"{head}:switch_interval=20 (`istune train --help` lists the options).")
        values[key] = _value(raw)
    for name, raw in rule_values.items():
        if name not in values and name in rule_catalog.traits(head).parameter_names():
            values[name] = _value(str(raw))
    try:
        ISTConfig(**values)
    except ValueError as error:
        raise ValueError(f"--arms: {text!r}: {error}") from None
    return Arm(text, values)


def _value(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def _fixed_layers(text: str, head: str, pairs: list[str], num_layers: int | None) -> list[int]:
    """The positions of ``quarter:K`` (N_u = 25% consecutive layers, the four spread evenly) or ``layers:A-B``."""
    if head == "quarter":
        if len(pairs) != 1 or pairs[0] not in {"1", "2", "3", "4"}:
            raise ValueError(f"--arms: {text!r}: write quarter:1 (bottom), quarter:2, quarter:3 or quarter:4 (top).")
        if num_layers is None:
            raise ValueError(f"--arms: {text!r} needs the model's layer count (num_hidden_layers in its config).")
        return quarter_layers(int(pairs[0]), num_layers)
    match = re.fullmatch(r"(\d+)-(\d+)", pairs[0]) if len(pairs) == 1 else None
    if match is None or int(match.group(1)) > int(match.group(2)):
        raise ValueError(f"--arms: {text!r}: write layers:A-B with 0 <= A <= B, e.g. layers:22-29.")
    first, last = int(match.group(1)), int(match.group(2))
    if num_layers is not None and last >= num_layers:
        raise ValueError(f"--arms: {text!r}: the model has {num_layers} layers (0-{num_layers - 1}).")
    return list(range(first, last + 1))


def arm_config(base: ISTConfig, arm: Arm, seed: int) -> ISTConfig:
    """``base`` (the flags) with the arm's values and ``seed``: of the rule parameters, only those the arm's rule
    declares carry over from ``base``; the rules that fix their layers take no N_u."""
    rule = rule_catalog.traits(arm.values["strategy"])
    parameters = rule_catalog.parameters()
    values = {name: value for name, value in base.to_dict().items()
              if name not in parameters or name in rule.parameter_names()}
    values.update(seed=seed, layers=None)
    if rule.trains_all_layers or rule.trains_given_layers:
        values.update(update_fraction=None, update_layers=None, recompute_unselected=False)
    values.update(arm.values)
    return ISTConfig(**values)


def without_rule_parameters(config: ISTConfig) -> dict[str, Any]:
    """``config``'s options without any rule's parameters (for another rule, which takes its own)."""
    parameters = rule_catalog.parameters()
    return {name: value for name, value in config.to_dict().items() if name not in parameters}


def parse_seeds(text: str) -> list[int]:
    """``--seeds N`` (seeds 1..N) or a comma-separated list; at least 2, so that there are intervals."""
    try:
        seeds = list(range(1, int(text) + 1)) if "," not in text else [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds={text!r}: give a count (5: seeds 1-5) or a list (1,2,3).") from None
    if len(set(seeds)) < 2:
        raise ValueError(f"--seeds={text!r}: at least 2 seeds are needed, or there are no paired intervals.")
    return sorted(set(seeds))


def settings(run: RunArgs, model_args: ModelArgs, adapter, ist: ISTConfig, training) -> dict[str, Any]:
    """What every run of a comparison shares: istune's options and the Trainer's, less what differs per run."""
    record = run_record(dataclasses.replace(run, overwrite=False), model_args, adapter, ist)
    record["ist"] = {k: v for k, v in record["ist"].items() if k != "seed"}
    record["training"] = {k: v for k, v in _jsonable(training.to_dict()).items() if k not in _PER_RUN}
    return record


def differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "",
                defaults: dict[str, Any] | None = None) -> list[str]:
    """``name: saved -> now`` for each value that differs, nested keys joined by dots. A key ``saved`` lacks
    counts as its value in ``defaults`` (nested as they are; :func:`option_defaults` by default): a run saved
    before an option existed had its default then."""
    defaults = option_defaults() if defaults is None else defaults
    found = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, defaults.get(key, "<unset>")), now.get(key, "<unset>")
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.", defaults.get(key) or {})
        elif old != new:
            found.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return found


def option_defaults() -> dict[str, dict[str, Any]]:
    """istune's options at their defaults, by record group (``run``, ``model_loading``, ``adapter``, ``ist``)."""
    from istune.adapters.methods import AdapterArgs

    groups = {"run": RunArgs, "model_loading": ModelArgs, "adapter": AdapterArgs}
    found = {name: {f.name: f.default for f in dataclasses.fields(group) if f.default is not dataclasses.MISSING}
             for name, group in groups.items()}
    return _jsonable({**found, "ist": ISTConfig().to_dict()})


def check_saved_options(out: Path, shared: dict[str, Any]) -> None:
    """Refuse an ``--out`` whose runs were made with other options (before any work), naming them."""
    path = out / COMPARE_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())["settings"]
    changed = differences(saved, shared)
    if changed:
        raise ValueError(f"--out={str(out)!r} holds runs made with other options ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); give the same options to add to it, or another "
                         "--out.")


def check_saved_run(folder: Path, expected: dict[str, Any]) -> None:
    """Refuse a saved run whose options are not the ones this run would have, naming the option and folder."""
    results = json.loads((folder / run_file.RESULTS_FILE).read_text())
    saved = {"run": results["run"], "model_loading": results["model_loading"], "adapter": results["adapter"],
             "ist": results["ist"], "training": {k: v for k, v in results["training"].items() if k not in _PER_RUN}}
    saved["run"]["overwrite"] = False
    changed = differences(saved, expected)
    if changed:
        raise ValueError(f"{folder} was made with other options ({'; '.join(changed[:4])}); move it away or use "
                         "another --out.")


def compare(arms: list[Arm], seeds: list[int], out: Path, run: RunArgs, model_args: ModelArgs, adapter,
            ist: ISTConfig, training, estimate: bool = True, say=print) -> list[Path]:
    """Make every missing (arm, seed) run, seed by seed; return the run folders in that order."""
    from istune.recipe.train import train

    check_output_dir(str(out))
    shared = settings(run, model_args, adapter, ist, training)
    check_saved_options(out, shared)
    plan = [(arm, seed) for seed in seeds for arm in arms]
    expected = {}
    for arm, seed in plan:  # every config built and every saved run checked before the first step
        config = arm_config(ist, arm, seed)
        expected[arm.name, seed] = config
        folder = comparison_run_folder(out, arm.name, seed)
        if run_file.run_state(folder) == run_file.COMPLETE:
            check_saved_run(folder, _run_expected(shared, config))
    missing = [(a, s) for a, s in plan
               if run_file.run_state(comparison_run_folder(out, a.name, s)) != run_file.COMPLETE]
    write_json(out / COMPARE_FILE, {"settings": shared, "arms": _union(out, [a.name for a in arms], "arms"),
                                    "seeds": sorted(set(_union(out, seeds, "seeds")))})
    say(f"istune compare: {len(plan)} runs ({len(arms)} arms x {len(seeds)} seeds), {len(plan) - len(missing)} "
        f"saved, {len(missing)} to make")
    if missing and estimate:
        say(f"istune compare: estimate {_estimate(out, plan, missing, run, model_args, adapter, ist, training)}")
    started = time.time()
    for done, (arm, seed) in enumerate(missing, 1):
        folder = comparison_run_folder(out, arm.name, seed)
        state = run_file.run_state(folder)
        options = {"output_dir": str(folder), "seed": seed, "data_seed": seed,
                   "resume_from_checkpoint": "true" if state == run_file.TRAINED else None}
        say(f"istune compare: run {done} of {len(missing)}: {arm.name}, seed {seed} -> {folder}")
        train(dataclasses.replace(run, overwrite=state not in (None, run_file.TRAINED)), adapter,
              expected[arm.name, seed], dataclasses.replace(training, **options), model_args)
        left = (time.time() - started) / done * (len(missing) - done)
        say(f"istune compare: {done} of {len(missing)} made; about {left / 60:.0f} min left")
    return [comparison_run_folder(out, a.name, s) for a, s in plan]


def _run_expected(shared: dict[str, Any], config: ISTConfig) -> dict[str, Any]:
    return {**shared, "ist": config.to_dict()}


def _union(out: Path, values: list, key: str) -> list:
    path = out / COMPARE_FILE
    saved = json.loads(path.read_text())[key] if path.is_file() else []
    return list(dict.fromkeys([*saved, *values]))


def _estimate(out: Path, plan, missing, run: RunArgs, model_args: ModelArgs, adapter, ist: ISTConfig,
              training) -> str:
    """The missing runs' time: from this comparison's saved runs, or else from 3 steps of LoRA on every layer
    (the arm with the most backward work) and one batch of evaluation, timed now."""
    saved = [json.loads((comparison_run_folder(out, a.name, s) / run_file.RESULTS_FILE).read_text())
             ["total_seconds"] for a, s in plan if (a, s) not in missing]
    if saved:
        per_run = sum(saved) / len(saved)
        return (f"{len(missing)} runs x {per_run / 60:.1f} min (the mean of the {len(saved)} saved) = "
                f"{len(missing) * per_run / 60:.0f} min")
    from istune.data import load_eval_items
    from istune.recipe.train import train

    steps, batch = 3, run.generation_batch_size
    items = sum(len(rows) for rows in load_eval_items(_eval_tasks(run), run.eval_limit, run.eval_seed).values())
    folder = Path(tempfile.mkdtemp(prefix="istune-compare-estimate-"))
    try:
        probe = train(
            dataclasses.replace(run, compare_base=False, curve_every=0, eval_limit=batch,
                                train_samples=steps * training.per_device_train_batch_size),
            adapter,
            ISTConfig(**{**without_rule_parameters(ist), "strategy": "all", "update_fraction": None,
                         "update_layers": None, "layers": None, "recompute_unselected": False}),
            dataclasses.replace(training, output_dir=str(folder), max_steps=steps, seed=plan[0][1],
                                logging_steps=steps, disable_tqdm=True),
            model_args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_step = probe["train_seconds"] / steps
    evaluation = (probe["total_seconds"] - probe["train_seconds"]) * math.ceil(items / batch)  # load, evaluate, save
    total_steps = training.max_steps if training.max_steps > 0 else steps
    evaluations = 1 + (total_steps - 1) // run.curve_every + 1 if run.curve_every else 1
    evaluations += 1 if run.compare_base else 0
    per_run = per_step * total_steps + evaluation * evaluations
    return (f"{len(missing)} runs x about {per_run / 60:.1f} min = {len(missing) * per_run / 60:.0f} min "
            f"({per_step:.2f} s a step for LoRA on every layer, {evaluation:.0f} s an evaluation of {items} items, "
            "timed just now; sparse arms train faster, IST's probes cost extra)")


def _eval_tasks(run: RunArgs) -> list[str]:
    from istune.runs import check_run

    return check_run(run)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def model_layer_count(model: str) -> int | None:
    """N_L from the model's config (``num_hidden_layers``, or its text config's), without loading weights."""
    from transformers import AutoConfig

    from istune.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    text = getattr(config, "text_config", None) or config
    return getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
