"""Find the decoder layers of a model and, in each, its adapter modules and trainable parameters.

Discovery works by structure, not by parameter names: the decoder layers are the
``nn.ModuleList`` of same-class blocks holding the most adapter modules (LLaMA, Qwen2,
Mistral, Gemma, Phi: ``model.layers``; GPT-2, BLOOM, GPT-J: ``transformer.h``; OPT:
``model.decoder.layers``; GPT-NeoX: ``gpt_neox.layers``), and an adapter module is a
peft tuner layer (``BaseTunerLayer``) or an istune bottleneck adapter. A user may name
the layer list instead (``layers_path``).

A layer without adapter modules whose own weights are trainable is a *full layer*
(LISA-style sparse tuning of whole blocks); :func:`prepare_full_layer_tuning` makes a
plain model ready for that.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class AdapterLayer:
    """One decoder layer as IST sees it.

    Attributes:
        index: position of the block in the model's layer list.
        name: dotted module name of the block.
        adapters: adapter modules inside the block (what eq. 8 suppresses); empty for a full layer.
        parameters: trainable parameters inside the block (what a selection trains).
        block: the decoder block itself.
        parameter_names: the names of ``parameters`` inside the block, same order.
        initial: for a full layer under IST, a copy of ``parameters`` taken before training
            (W0, see :func:`snapshot_initial_weights`); None otherwise.
    """

    index: int
    name: str
    adapters: list[nn.Module]
    parameters: list[nn.Parameter]
    block: nn.Module | None = None
    parameter_names: list[str] = field(default_factory=list)
    initial: list[torch.Tensor] | None = None

    @property
    def is_full_layer(self) -> bool:
        """True when the block trains its own weights (no adapter modules)."""
        return not self.adapters


def is_adapter_module(module: nn.Module) -> bool:
    """True for a peft tuner layer or an istune adapter (anything that wraps a ``base_layer``)."""
    return (isinstance(module, loaded_peft_class("peft.tuners.tuners_utils", "BaseTunerLayer"))
            or getattr(module, "is_istune_adapter", False))


def loaded_peft_class(module: str, name: str) -> type | tuple:
    """peft's class ``module.name`` once peft has loaded it, else ``()`` (``isinstance`` then matches nothing).

    A model can hold peft layers only after peft was imported, so the core recognises them without importing
    peft (and what peft imports, bitsandbytes among them): ``import istune`` stays light.
    """
    return getattr(sys.modules.get(module), name, ())


def find_adapter_layers(model: nn.Module, layers_path: str | None = None) -> list[AdapterLayer]:
    """List the decoder layers that hold trainable parameters, in model order.

    The trainable parameters are read from ``requires_grad`` now, so call this before
    anything freezes them. Layers without any trainable parameter (e.g. peft's
    ``layers_to_transform``) are left out: N_L counts the layers that hold adapters.

    Raises:
        ValueError: no layer list was found, no layer holds a trainable parameter, or a
            trainable parameter is shared by several layers (it cannot train in one layer
            and stay frozen in another).
    """
    path, blocks = layer_list(model, layers_path)
    layers = []
    for index, block in enumerate(blocks):
        adapters = [m for m in block.modules() if is_adapter_module(m)]
        named = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
        if named:
            layers.append(AdapterLayer(index, f"{path}.{index}", adapters, [p for _, p in named], block=block,
                                       parameter_names=[n for n, _ in named]))
    if not layers:
        raise ValueError(
            f"No trainable parameters inside the decoder layers at '{path}' ({len(blocks)} layers of "
            f"{type(blocks[0]).__name__}). Trainable parameters found elsewhere: {_trainable_summary(model)}. "
            "Add adapters inside the layers (e.g. peft LoRA on q_proj/v_proj) before starting IST; prompt-based "
            "tuners (prompt, prefix, p-tuning) keep their parameters outside the layers and cannot be used."
        )
    _refuse_shared_parameters(layers)
    return layers


def prepare_full_layer_tuning(
    model: nn.Module, *, train_embeddings: bool = False, train_head: bool = False, layers_path: str | None = None
) -> nn.Module:
    """Make a plain model ready for sparse tuning of whole decoder layers (LISA-style), in place.

    Every parameter is frozen except those of the decoder blocks; LISA also trains the
    input embeddings and the LM head at every step (``train_embeddings=True,
    train_head=True``). Parameters outside the blocks are never frozen by IST nor
    suppressed in its probes. With tied embeddings (GPT-2) the head trains with the
    embeddings. Build the optimizer afterwards, over ``p.requires_grad`` parameters.

    Example:
        >>> model = prepare_full_layer_tuning(AutoModelForCausalLM.from_pretrained(name))
        >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        >>> tuner = SparseTuner(model, ISTConfig(strategy="ist"), optimizer=optimizer)

    Raises:
        ValueError: the model already holds adapter modules, has no layer list, or has quantized decoder layers.
    """
    adapters = [name for name, m in model.named_modules() if is_adapter_module(m)]
    if adapters:
        raise ValueError("prepare_full_layer_tuning is for a model without adapters, but this one has "
                         f"{len(adapters)} adapter modules (e.g. '{adapters[0]}'); start from the plain base model.")
    if layers_path is None:
        candidates = _candidates(model)
        if not candidates:
            raise ValueError(f"No list of decoder layers (an nn.ModuleList of same-class blocks) found in "
                             f"{type(model).__name__}; pass layers_path=...")
        layers_path = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))[0]
    _, blocks = layer_list(model, layers_path)
    quantized = [(name, p.dtype) for name, p in blocks.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise ValueError(f"Full-layer tuning needs floating-point weights, but the decoder layers hold quantized ones "
                         f"(e.g. '{layers_path}.{quantized[0][0]}', {quantized[0][1]}): they can neither train nor "
                         "have their change suppressed (W0 + β·(W − W0)). Put adapters on the quantized model "
                         "instead (QLoRA: peft LoRA or DoRA), or load it unquantized.")
    extra = []
    for wanted, what, getter in ((train_embeddings, "input embeddings", "get_input_embeddings"),
                                 (train_head, "LM head", "get_output_embeddings")):
        module = getattr(model, getter, lambda: None)() if wanted else None
        if wanted and module is None:
            raise ValueError(f"{type(model).__name__} has no {what} ({getter}() gave None); leave it frozen.")
        extra += [module] if module is not None else []
    model.requires_grad_(False)
    for module in [blocks, *extra]:
        module.requires_grad_(True)
    return model


def snapshot_initial_weights(
    layers: list[AdapterLayer],
    device: torch.device | str = "cpu",
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Keep a copy W0 of every full layer's trainable weights in ``layer.initial``; return its bytes.

    Suppressing a full layer's change (eq. 8 for whole blocks) needs the weights it started
    from. The copy costs as much memory as the trainable blocks (``device="cpu"`` keeps it off
    the accelerator; it is pinned when the weights are on CUDA, for fast copies back).
    Layers with adapter modules need nothing and are left alone.

    Args:
        layers: from :func:`find_adapter_layers`.
        device: where the copy lives.
        initial_state: the weights training started from, by full parameter name (e.g. the
            pretrained model's ``state_dict()``), for a run resumed from a checkpoint; default:
            the weights now.
    """
    total = 0
    for layer in layers:
        if not layer.is_full_layer:
            continue
        copies = []
        for name, parameter in zip(layer.parameter_names, layer.parameters):
            source = parameter
            if initial_state is not None:
                source = _initial_tensor(initial_state, f"{layer.name}.{name}", parameter)
            copy = source.detach().to(device=device, dtype=parameter.dtype, copy=True)
            if copy.device.type == "cpu" and parameter.device.type == "cuda":
                copy = copy.pin_memory()
            copies.append(copy)
            total += copy.numel() * copy.element_size()
        layer.initial = copies
    return total


def _initial_tensor(state: Mapping[str, torch.Tensor], name: str, parameter: nn.Parameter) -> torch.Tensor:
    if name not in state:
        raise ValueError(f"initial_state has no weight '{name}' (it has e.g. {list(state)[:3]}); give the state dict "
                         "of the model training started from, with the same parameter names.")
    if tuple(state[name].shape) != tuple(parameter.shape):
        raise ValueError(f"initial_state['{name}'] has shape {tuple(state[name].shape)}, the model's weight "
                         f"{tuple(parameter.shape)}.")
    return state[name]


def _refuse_shared_parameters(layers: list[AdapterLayer]) -> None:
    owners: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for layer in layers:
        for name, parameter in zip(layer.parameter_names, layer.parameters):
            owners.setdefault(id(parameter), []).append(layer.index)
            names.setdefault(id(parameter), f"{layer.name}.{name}")
    shared = [(names[key], indices) for key, indices in owners.items() if len(indices) > 1]
    if shared:
        name, indices = shared[0]
        raise ValueError(
            f"{len(shared)} trainable parameters are shared by several decoder layers (e.g. '{name}' by layers "
            f"{indices}; VB-LoRA's vector bank is one). IST trains some layers and freezes the others each step, "
            "which a parameter shared across layers defeats. Use a tuner whose parameters belong to one layer each."
        )


def layer_list(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of ``model`` and its dotted name: ``layers_path`` if given, else the
    ModuleList of same-class blocks holding the most adapter modules (then trainable parameters)."""
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
            "Wrap the model with peft (get_peft_model) or istune's adapters first, or call "
            "istune.core.layers.prepare_full_layer_tuning(model) to tune whole layers. Prompt-based tuners "
            "(prompt, prefix, p-tuning) keep their parameters outside the layers and cannot be used."
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
