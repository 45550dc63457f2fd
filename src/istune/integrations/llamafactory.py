"""IST inside LLaMA-Factory: its training run (``llamafactory.train.tuner.run_exp``) with an ISTCallback.

    python -m istune.integrations.llamafactory examples/llamafactory/smollm2_lora_sft_ist.yaml [ist.mu=100 ...]

The config is LLaMA-Factory's own training YAML (or JSON) with one more section, ``ist:``, whose keys
are :class:`~istune.config.ISTConfig`'s options under their own names: its fields and the selection rules'
parameters (``ist: {}`` trains with the paper's defaults). ISTConfig checks them before LLaMA-Factory loads
anything. Command-line overrides are LLaMA-Factory's own (OmegaConf's ``key=value``,
``ist.update_fraction=0.5`` for IST). From Python::

    run_exp_with_ist({"model_name_or_path": ..., "stage": "sft", "finetuning_type": "lora", ...},
                     ist={"update_fraction": 0.25, "mu": 10})

Two of LLaMA-Factory's arguments are set for IST when the config leaves them out, and refused when it
sets them the other way (:data:`IST_NEEDS`): ``ddp_find_unused_parameters`` (LLaMA-Factory turns it off
for LoRA under DDP, and DDP then fails on the adapters IST froze for the step) and ``use_reentrant_gc``
(LLaMA-Factory checkpoints activations in the reentrant variant unless told, which fails under DDP with
``find_unused_parameters``). Stages and options that select what trains by themselves are refused
(:data:`REFUSED`).

LLaMA-Factory builds its Trainer inside ``run_exp`` and lets no caller reach it, so IST comes in as
``ISTCallback(config)`` in the ``callbacks`` it passes on (the one-line form of
:mod:`istune.integrations.hf`): the DDP settings are checked from the arguments the Trainer builds DDP
from, the reporters named in ``report_to`` get no IST metric (they are in ``ist_log.jsonl`` and
``trainer_state.json``), and FSDP2 trains only with ``save_strategy: "no"``. docs/llamafactory.md says
how to install it and what was tested.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from istune.config import ISTConfig, option_names
from istune.integrations.hf import ISTCallback
from istune.option_checks import did_you_mean

IST_SECTION = "ist"  # the key of IST's options in LLaMA-Factory's config

# LLaMA-Factory's arguments IST needs: (value, why). Set when absent, refused when set otherwise.
IST_NEEDS = {
    "ddp_find_unused_parameters": (
        True, "under DDP the adapters IST freezes for a step get no gradient, and DDP with "
        "find_unused_parameters=False fails on them (LLaMA-Factory sets False for LoRA when the key is absent)"),
    "use_reentrant_gc": (
        False, "reentrant activation checkpointing under DDP with find_unused_parameters=True fails with "
        "'Expected to mark a variable ready only once' (LLaMA-Factory's default is reentrant)"),
}
# LLaMA-Factory's arguments IST cannot train with: (value refused, why and what to do instead).
REFUSED = {
    "stage": ("ppo", "LLaMA-Factory's PPO loop calls the Trainer's callbacks without the model and skips "
              "on_step_begin, where IST selects the layers; use stage sft, pt, rm, dpo or kto"),
    "use_badam": (True, "BAdam trains blocks of layers in turn by itself, and two selectors would fight over "
                  "requires_grad; use IST's own BAdam rule instead: ist: {strategy: badam}"),
}


def ist_config(options: ISTConfig | Mapping[str, Any] | None) -> ISTConfig:
    """The ISTConfig that ``options`` (the ``ist:`` section) describes; ISTConfig's own checks apply.

    Args:
        options: an ISTConfig, a mapping of ISTConfig's options, or None (``ist:`` left empty: the paper's defaults).

    Raises:
        ValueError: a key that is not an ISTConfig option, or a value ISTConfig refuses.
        TypeError: ``options`` is neither a mapping nor an ISTConfig.
    """
    if options is None:
        return ISTConfig()
    if isinstance(options, ISTConfig):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"{IST_SECTION}={options!r}: IST's options are a mapping of ISTConfig's options, e.g. "
                        f"{IST_SECTION}: {{update_fraction: 0.25, mu: 10}}; leave it empty for the paper's defaults.")
    names = option_names()
    for key in options:
        if key not in names:
            raise ValueError(f"{IST_SECTION}.{key}={options[key]!r} is not an ISTConfig option; "
                             f"{did_you_mean(key, names)}the options are: {', '.join(names)} (its fields and the "
                             "selection rules' parameters).")
    return ISTConfig(**options)


def prepare_args(args: Mapping[str, Any], ist: ISTConfig | Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, Any], ISTConfig]:
    """Split IST's options off LLaMA-Factory's arguments and set what IST needs in the rest.

    Args:
        args: LLaMA-Factory's training arguments as its YAML reads, with or without an ``ist:`` section.
        ist: IST's options, when not in ``args``; with neither, the paper's defaults.

    Returns:
        The arguments for ``run_exp`` (a new dict: ``args`` is left as it was) and the ISTConfig.

    Raises:
        ValueError: a bad IST option; IST's options given twice; an argument IST cannot train with.
    """
    args = dict(args)
    section = args.pop(IST_SECTION, None)
    if ist is not None and section is not None:
        raise ValueError(f"IST's options are given twice: in args[{IST_SECTION!r}] and in ist=...; keep one.")
    config = ist_config(ist if ist is not None else section)
    for key, (value, why) in REFUSED.items():
        if args.get(key) == value:
            raise ValueError(f"{key}={value!r} cannot train with IST: {why}.")
    for key, (value, why) in IST_NEEDS.items():
        given = args.get(key)
        if given is None:
            args[key] = value
        elif given != value:
            raise ValueError(f"{key}={given!r} cannot train with IST, which needs {key}={value!r}: {why}. "
                             f"Remove {key} from the config (it is set for IST) or set it to {value!r}.")
    return args, config


def run_exp_with_ist(args: Mapping[str, Any], ist: ISTConfig | Mapping[str, Any] | None = None,
                     callbacks: Sequence | None = None, **callback_options) -> ISTCallback:
    """Train with LLaMA-Factory's ``run_exp``, IST choosing the layers whose adapters train each step.

    Args:
        args: LLaMA-Factory's training arguments (its YAML as a dict), optionally with an ``ist:`` section.
        ist: IST's options (an ISTConfig or a mapping of its fields), when not in ``args``.
        callbacks: more Trainer callbacks for ``run_exp``; they run after IST's.
        **callback_options: the other arguments of :class:`~istune.integrations.hf.ISTCallback`
            (``probe_dataset``, ``log_file``, ``readable_console``, ``rule``).

    Returns:
        The ISTCallback, whose ``importance`` and ``tuner`` hold the state training ended with.

    Raises:
        ValueError: a bad IST option or an argument IST cannot train with, before LLaMA-Factory starts.
        ImportError: LLaMA-Factory is not installed.

    Example:
        >>> run_exp_with_ist(yaml.safe_load(open("examples/llamafactory/smollm2_lora_sft_ist.yaml")))
    """
    run_args, config = prepare_args(args, ist)
    callback = ISTCallback(config, **callback_options)
    _run_exp()(run_args, callbacks=[callback, *(callbacks or [])])
    return callback


def _run_exp():
    try:
        from llamafactory.train.tuner import run_exp
    except ImportError as error:
        raise ImportError(f"IST in LLaMA-Factory needs LLaMA-Factory ({error}); install it beside istune as "
                          "docs/llamafactory.md says: pip install llamafactory==0.9.5.") from error
    return run_exp


def main() -> None:
    """``python -m istune.integrations.llamafactory config.yaml [key=value ...]``: LLaMA-Factory's train command."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("\n\n".join(__doc__.split("\n\n")[:3]))  # what it is, the command, the config
        return
    try:
        _run_exp()  # LLaMA-Factory is installed (or the install hint)
        from llamafactory.hparams import read_args  # LLaMA-Factory's reading: the file, then key=value overrides
    except ImportError as error:  # the install hint in one line, not a traceback
        raise SystemExit(f"python -m istune.integrations.llamafactory: {error}") from None
    args = read_args()
    if not isinstance(args, dict):
        raise SystemExit(f"python -m istune.integrations.llamafactory takes a YAML or JSON config file (got "
                         f"{sys.argv[1]!r}); put LLaMA-Factory's arguments and the {IST_SECTION}: section in one.")
    run_exp_with_ist(args)


if __name__ == "__main__":
    main()
