"""IST in axolotl: a plugin that reads ``ist_*`` keys from the axolotl config and adds IST to axolotl's Trainer.

    # axolotl config (YAML)
    plugins:
      - istune.integrations.axolotl.ISTPlugin
    ist_update_layers: 2        # any ISTConfig option, prefixed with ist_; the rest keep ISTConfig's defaults
    ist_probe_interval: 10

    axolotl train config.yaml

The ``ist_*`` keys are ISTConfig's options with the prefix (its fields and every registered rule's
parameters, :func:`istune.config.option_names`), and they are checked by building the
:class:`~istune.config.ISTConfig` itself when axolotl validates its config:
a bad value fails there with ISTConfig's error, led by the ``ist_`` key. Once axolotl has built its
Trainer (the ``post_trainer_create`` hook), :func:`istune.add_ist` adds the callback with the Trainer
in hand, as in any other Trainer (:mod:`istune.integrations.hf`).

Refused before training: axolotl's own LISA (``lisa_*``), which would fight IST over which layers
train; and axolotl's fused LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``)
with what they bypass: an adapter that IST suppresses through a forward hook on peft's module (DoRA
and other LoRA variants) and a rule that measures outlier ratios ('owlore'), which records each linear
map's input with forward hooks. Plain LoRA/QLoRA with the kernels is allowed: the kernels read
``scaling[adapter]`` at every forward (so IST's β reaches them) and pass the adapters' weights to
autograd, which drops the gradients of the frozen ones; see docs/axolotl.md for what has and has not been run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, create_model, model_validator

from istune import rule_catalog
from istune.config import ISTConfig, option_names
from istune.core.layers import is_adapter_module
from istune.core.suppress import scales_linearly
from istune.integrations.hf import add_ist
from istune.option_checks import did_you_mean

PREFIX = "ist_"
AXOLOTL_LISA_KEYS = ("lisa_n_layers", "lisa_step_interval")  # both set: axolotl adds its LISA callback
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def ist_keys() -> dict[str, str]:
    """axolotl key -> ISTConfig option, for the options known now (a rule registered later adds its own)."""
    return {PREFIX + name: name for name in option_names()}


def ist_config(values: Mapping[str, Any]) -> ISTConfig:
    """The ISTConfig that the ``ist_*`` keys of an axolotl config describe; every other key is ignored.

    Args:
        values: the axolotl config (a dict or axolotl's ``DictDefault``).

    Raises:
        ValueError: an ``ist_*`` key that is no ISTConfig field, or ISTConfig's own error for a bad value,
            led by the ``ist_`` key.
    """
    keys = ist_keys()
    unknown = sorted(key for key in values if key.startswith(PREFIX) and key not in keys)
    if unknown:
        hint = did_you_mean(unknown[0], keys)
        raise ValueError(f"axolotl config key {unknown[0]!r} is no IST option: {hint}the ist_ keys are "
                         f"{', '.join(keys)} (ISTConfig's options; docs/axolotl.md).")
    given = {keys[key]: value for key, value in values.items() if key in keys}
    try:
        return ISTConfig(**given)
    except ValueError as error:
        name = next((name for name in keys.values() if str(error).startswith(f"ISTConfig.{name}=")), None)
        if name is None:
            raise
        key = f"{PREFIX}{name}={given[name]!r}" if name in given else f"{PREFIX}{name}"
        raise ValueError(f"{key} in the axolotl config: {error}") from error


def refuse_axolotl_lisa(values: Mapping[str, Any]) -> None:
    """Refuse axolotl's LISA beside IST: both would choose, every few steps, the layers that train."""
    lisa = {key: values[key] for key in AXOLOTL_LISA_KEYS if values.get(key) is not None}
    if lisa:
        settings = ", ".join(f"{key}={value!r}" for key, value in lisa.items())
        raise ValueError(
            f"axolotl's LISA ({settings}) and IST (plugin istune.integrations.axolotl.ISTPlugin) both choose the "
            "layers that train and would undo each other's freezing. Remove the lisa_* keys; for LISA under "
            "istune use its rule instead: ist_strategy: lisa, ist_update_layers: <lisa_n_layers>, "
            "ist_switch_interval: <lisa_step_interval>.")


def refuse_bypassed_hooks(values: Mapping[str, Any], model) -> None:
    """Refuse axolotl's fused LoRA kernels where they skip the module calls that IST hooks.

    The kernels compute ``q/k/v/o`` and the MLP from the adapters' weights directly, so no forward
    hook on a LoRA module or its ``base_layer`` runs. IST suppresses plain LoRA through ``scaling``
    (read by the kernels), but other adapters through a hook that blends outputs, and 'owlore'
    records inputs with hooks: with the kernels, the first would not be suppressed at all and the
    second would measure nothing.
    """
    kernels = [key for key in LORA_KERNEL_KEYS if values.get(key)]
    if not kernels:
        return
    fix = f"set {', '.join(f'{key}: false' for key in kernels)} in the axolotl config"
    strategy = values.get(PREFIX + "strategy")
    rule = rule_catalog.traits(strategy) if isinstance(strategy, str) else None
    if rule is not None and rule.uses_outlier_ratios:
        raise ValueError(f"ist_strategy={strategy!r} records the input of every linear map through forward hooks, "
                         f"which axolotl's fused LoRA kernels ({', '.join(kernels)}) skip; {fix}, or use another "
                         "selection rule.")
    hooked = sorted({type(module).__name__ for module in model.modules()
                     if is_adapter_module(module) and not scales_linearly(module)})
    if hooked:
        raise ValueError(f"IST suppresses {', '.join(hooked)} adapters (DoRA or another LoRA variant) through a "
                         f"forward hook on peft's module, which axolotl's fused LoRA kernels ({', '.join(kernels)}) "
                         f"skip, so its probes would not be suppressed; {fix}, or use plain LoRA.")


class ISTOptions(BaseModel):
    """Checks that run when axolotl validates its config (the ``ist_*`` fields are added below)."""

    @model_validator(mode="before")
    @classmethod
    def check_ist_options(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            refuse_axolotl_lisa(data)
            ist_config(data)
        return data


def ist_args_model() -> type[BaseModel]:
    """One axolotl config field per ISTConfig option, named with the prefix. Typed Any with default None, so that
    pydantic converts nothing and ISTConfig checks every given value itself; None (not given) is dropped when
    axolotl dumps its config, and ISTConfig's default applies."""
    parameters = rule_catalog.parameters()
    helps = {name: rule_catalog.help_text(parameters[name]) if name in parameters else
             ISTConfig.__dataclass_fields__[name].metadata.get("help", "") for name in option_names()}
    return create_model("ISTArgs", __base__=ISTOptions,
                        __doc__="The ist_* keys of an axolotl config: ISTConfig's options with the prefix.",
                        **{PREFIX + name: (Any, Field(default=None, description=text))
                           for name, text in helps.items()})


def __getattr__(name: str) -> Any:
    # ISTArgs, which axolotl imports by name (ISTPlugin.get_input_args), is built when first asked for, so that
    # the rules registered by then (a plugin of the user's, listed before this one, may register its own) have
    # their ist_* keys.
    if name == "ISTArgs":
        model = globals()["ISTArgs"] = ist_args_model()
        return model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ISTPlugin(BasePlugin):
    """Turns IST on in axolotl: list it under ``plugins:``, tune it with ``ist_*`` keys.

    Example:
        >>> # axolotl config: plugins: [istune.integrations.axolotl.ISTPlugin] and ist_update_layers: 2
    """

    def get_input_args(self) -> str:
        return f"{__name__}.ISTArgs"

    def post_trainer_create(self, cfg, trainer) -> None:
        config = ist_config(cfg)
        refuse_bypassed_hooks(cfg, trainer.model)
        add_ist(trainer, config)
