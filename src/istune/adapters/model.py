"""Inject, find, count, save and load bottleneck adapters on any transformers model.

Example::

    model = add_bottleneck_adapters(model, BottleneckConfig(kind="series"))
    trainable, total = count_trainable_parameters(model)
    save_bottleneck_adapters(model, "out/adapters")
    fresh = load_bottleneck_adapters(AutoModelForCausalLM.from_pretrained(...), "out/adapters")
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import DEFAULT_TARGET_MODULES, BottleneckConfig
from .layer import BottleneckLayer, linear_features

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_adapters.safetensors"
_FORMAT = "istune-bottleneck"
_VERSION = 1


def _outer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs of ``model``, skipping whatever lives inside a BottleneckLayer."""
    found, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        found.append((name, module))
        inside += (name + ".",) if isinstance(module, BottleneckLayer) else ()
    return found


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear / Conv1D in ``model`` (the modules that can be targeted)."""
    return [name for name, module in _outer_modules(model) if linear_features(module) is not None]


def bottleneck_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    """Every BottleneckLayer in ``model`` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; shared tensors are counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def resolve_target_modules(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Full names of the modules ``config`` targets in ``model``; raise if none match."""
    targets = config.target_modules
    family = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        if family not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules=None but model family {family!r} has no default: set "
                f"BottleneckConfig.target_modules to some of {linear_module_names(model)} "
                f"(families with defaults: {sorted(DEFAULT_TARGET_MODULES)}).")
        targets = DEFAULT_TARGET_MODULES[family][config.kind]
    matched = [name for name, _ in _outer_modules(model) if name and _matches(name, targets)]
    if not matched:
        raise ValueError(f"target_modules={targets!r} matched no module of this "
                         f"{type(model).__name__}. Its linear modules are: "
                         f"{linear_module_names(model)}")
    for name in matched:
        module = model.get_submodule(name)
        if isinstance(module, BottleneckLayer):
            raise ValueError(f"module {name!r} already holds a bottleneck adapter: target "
                             "other modules, or start again from a fresh base model.")
        if linear_features(module) is None:
            raise ValueError(f"target_modules={targets!r} matched {name!r}, a "
                             f"{type(module).__name__}; bottleneck adapters wrap linear "
                             f"layers only. Linear modules: {linear_module_names(model)}")
    return matched


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_bottleneck_adapters(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in place and return it.

    Every parameter of the base model is frozen; only adapter parameters (of this and
    any earlier call) stay trainable. Call again with another config to add adapters of
    a second kind to other modules (e.g. the paper's series recipe on up and down).
    """
    names = resolve_target_modules(model, config)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BottleneckLayer(getattr(parent, child), config))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in bottleneck_layers(model).values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    return model


# The paper's placements (Table 9, after LLM-Adapters): series adapters on the MLP's up
# projection (input side) and down projection (output side, eq. 13); parallel adapters
# beside up and gate (eq. 11). Families without a gate use their one up projection.
PAPER_METHODS = ("series", "parallel")


def add_paper_bottleneck_adapters(model: nn.Module, method: str = "series", **fields) -> nn.Module:
    """Add the paper's series or parallel adapters (Table 9 placement) to ``model`` in place.

    ``series``: output side of the MLP down projection plus input side of the up projection
    ({Up, Down}); ``parallel``: beside the up and gate projections ({Up, Gate}). ``fields``
    go to every :class:`BottleneckConfig` (``bottleneck_size`` defaults to the paper's 256).

    Example::

        model = add_paper_bottleneck_adapters(model, "parallel", bottleneck_size=256)
    """
    if method not in PAPER_METHODS:
        raise ValueError(f"method={method!r} is invalid: use one of {', '.join(PAPER_METHODS)}.")
    if "kind" in fields or "target_modules" in fields:
        raise ValueError("add_paper_bottleneck_adapters places adapters itself; call add_bottleneck_adapters "
                         "for your own kind/target_modules.")
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"model family {family!r} has no paper placement "
                         f"(families: {sorted(DEFAULT_TARGET_MODULES)}); "
                         "use add_bottleneck_adapters with target_modules from "
                         f"{linear_module_names(model)[:6]}.")
    defaults = DEFAULT_TARGET_MODULES[family]
    if method == "parallel":
        config = BottleneckConfig(kind="parallel", target_modules=defaults["parallel"], **fields)
        return add_bottleneck_adapters(model, config)
    up = [name for name in defaults["series_input"] if name != "gate_proj"]
    add_bottleneck_adapters(model, BottleneckConfig(kind="series", target_modules=defaults["series"], **fields))
    return add_bottleneck_adapters(model, BottleneckConfig(kind="series_input", target_modules=up, **fields))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel, so names match on load."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def save_bottleneck_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter weights (safetensors) and their configs (JSON) to ``directory``.

    Each file is written to a temporary file in the same folder and renamed into place,
    so a crash never leaves a half-written file under the final name.
    """
    layers = bottleneck_layers(_unwrap(model))
    if not layers:
        raise ValueError("model has no bottleneck adapters to save: call "
                         "add_bottleneck_adapters(model, config) first.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, groups = {}, []
    for name, layer in layers.items():
        for key, value in (("adapter_down.weight", layer.adapter_down.weight),
                           ("adapter_up.weight", layer.adapter_up.weight)):
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
        group = next((g for g in groups if g["config"] is layer.config), None)
        if group is None:
            group = {"config": layer.config, "modules": []}
            groups.append(group)
        group["modules"].append(name)
    manifest = {"format": _FORMAT, "version": _VERSION,
                "adapters": [{"config": dataclasses.asdict(g["config"]), "modules": g["modules"]}
                             for g in groups]}
    _atomic_write(directory / WEIGHTS_NAME,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME,
                  lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return directory


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_bottleneck_adapters(base_model: nn.Module, directory: str | os.PathLike,
                             *, trainable: bool = False) -> nn.Module:
    """Inject the saved adapters into a fresh ``base_model`` and load their weights.

    Args:
        base_model: the same architecture the adapters were trained on, without adapters.
        directory: a folder written by ``save_bottleneck_adapters``.
        trainable: leave the adapter parameters trainable (to continue training);
            by default every parameter is frozen, for inference.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: point to a folder written by "
                                    "save_bottleneck_adapters.")
    manifest = json.loads(config_path.read_text())
    found = (manifest.get("format"), manifest.get("version"))
    if found != (_FORMAT, _VERSION):
        raise ValueError(f"{config_path} is not an {_FORMAT} v{_VERSION} manifest "
                         f"(format, version = {found!r}): save it with save_bottleneck_adapters.")
    model = _unwrap(base_model)
    for group in manifest["adapters"]:
        fields = {**group["config"], "target_modules": group["modules"]}
        add_bottleneck_adapters(model, BottleneckConfig(**fields))
    state = load_file(str(weights_path))
    params = {f"{name}.{key}": getattr(layer, key.split(".")[0]).weight
              for name, layer in bottleneck_layers(model).items()
              for key in ("adapter_down.weight", "adapter_up.weight")}
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit this model: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}.")
    with torch.no_grad():
        for key, param in params.items():
            if param.shape != state[key].shape:
                raise ValueError(f"{key}: saved shape {tuple(state[key].shape)} differs from "
                                 f"the model's {tuple(param.shape)}; load onto the same "
                                 "architecture the adapters were trained on.")
            param.copy_(state[key])
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and name in params)
    return base_model
