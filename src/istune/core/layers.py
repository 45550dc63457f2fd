"""Find the decoder layers of a model and, in each, its adapter modules and trainable parameters.

Discovery works by structure, not by parameter names: the decoder layers are the
``nn.ModuleList`` of same-class blocks holding the most adapter modules (LLaMA, Qwen2,
Mistral, Gemma, Phi: ``model.layers``; GPT-2, BLOOM, GPT-J: ``transformer.h``; OPT:
``model.decoder.layers``; GPT-NeoX: ``gpt_neox.layers``), and an adapter module is a
peft tuner layer (``BaseTunerLayer``) or an istune bottleneck adapter. A user may name
the layer list instead (``layers_path``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

try:  # peft is a dependency, but keep the core importable without it
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # pragma: no cover
    BaseTunerLayer = ()


@dataclass
class AdapterLayer:
    """One decoder layer as IST sees it.

    Attributes:
        index: position of the block in the model's layer list.
        name: dotted module name of the block.
        adapters: adapter modules inside the block (what eq. 8 suppresses).
        parameters: trainable parameters inside the block (what a selection trains).
    """

    index: int
    name: str
    adapters: list[nn.Module]
    parameters: list[nn.Parameter]


def is_adapter_module(module: nn.Module) -> bool:
    """True for a peft tuner layer or an istune adapter (anything that wraps a ``base_layer``)."""
    return isinstance(module, BaseTunerLayer) or getattr(module, "is_istune_adapter", False)


def find_adapter_layers(model: nn.Module, layers_path: str | None = None) -> list[AdapterLayer]:
    """List the decoder layers that hold trainable parameters, in model order.

    The trainable parameters are read from ``requires_grad`` now, so call this before
    anything freezes them. Layers without any trainable parameter (e.g. peft's
    ``layers_to_transform``) are left out: N_L counts the layers that hold adapters.

    Raises:
        ValueError: no layer list was found, or no layer holds a trainable parameter.
    """
    path, blocks = _layer_list(model, layers_path)
    layers = []
    for index, block in enumerate(blocks):
        adapters = [m for m in block.modules() if is_adapter_module(m)]
        parameters = [p for p in block.parameters() if p.requires_grad]
        if parameters:
            layers.append(AdapterLayer(index, f"{path}.{index}", adapters, parameters))
    if not layers:
        raise ValueError(
            f"No trainable parameters inside the decoder layers at '{path}' ({len(blocks)} layers of "
            f"{type(blocks[0]).__name__}). Trainable parameters found elsewhere: {_trainable_summary(model)}. "
            "Add adapters inside the layers (e.g. peft LoRA on q_proj/v_proj) before starting IST."
        )
    return layers


def _layer_list(model: nn.Module, layers_path: str | None) -> tuple[str, nn.ModuleList]:
    if layers_path is not None:
        try:
            blocks = model.get_submodule(layers_path)
        except AttributeError as error:
            raise ValueError(f"ISTConfig.layers_path={layers_path!r} names no module of this model ({error}); "
                             f"candidate layer lists: {_candidate_summary(model)}") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(f"ISTConfig.layers_path={layers_path!r} is a {type(blocks).__name__}, not a non-empty "
                             "nn.ModuleList of decoder layers")
        return layers_path, blocks
    candidates = _candidates(model)
    if not candidates:
        raise ValueError(f"No list of decoder layers (an nn.ModuleList of same-class blocks) found in "
                         f"{type(model).__name__}; set ISTConfig.layers_path to its dotted name")
    best = max(candidates, key=lambda c: (c[2], c[3]))
    if best[2] == 0 and best[3] == 0:
        raise ValueError(
            f"No adapter modules or trainable parameters inside any layer list of {type(model).__name__}: "
            f"found {_candidate_summary(model)}; trainable parameters: {_trainable_summary(model)}. "
            "Wrap the model with peft (get_peft_model) or istune's adapters first."
        )
    return best[0], best[1]


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList, int, int]]:
    """Every ModuleList of same-class blocks with its adapter and trainable-parameter counts."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(b) for b in module}) == 1:
            adapters = sum(is_adapter_module(m) for m in module.modules())
            trainable = sum(p.requires_grad for p in module.parameters())
            found.append((name, module, adapters, trainable))
    return found


def _candidate_summary(model: nn.Module) -> str:
    found = [f"'{n}' ({len(m)}x {type(m[0]).__name__}, {a} adapters)" for n, m, a, _ in _candidates(model)]
    return ", ".join(found) or "none"


def _trainable_summary(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
