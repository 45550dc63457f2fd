"""Find the decoder layers of a model and, in each, its adapter modules and trainable parameters.

Discovery works by structure, not by parameter names. The decoder layers are the language
model's layer list as the model describes it: the ``nn.ModuleList`` inside ``get_decoder()``
whose length is the (text) config's ``num_hidden_layers`` (LLaMA, Qwen2, Mistral, Gemma:
``model.layers``; GPT-2: ``transformer.h``; OPT: ``model.decoder.layers``; Mllama:
``model.language_model.layers``, never the vision tower's). Its blocks may be of several
classes (Jamba's attention and Mamba blocks). A model without a transformers config falls
back to the ``nn.ModuleList`` holding the most adapter modules. A user may name the layer
list instead (``layers_path``). An adapter module is a peft tuner layer (``BaseTunerLayer``)
or an istune bottleneck adapter.

A multimodal model's vision (or audio) tower is left out unless asked for
(``towers="select"``): then each tower's blocks that hold trainable parameters
(:func:`tower_block_lists`: the blocks of the tower's outermost ``nn.ModuleList``, e.g. CLIP's
``encoder.layers``, Qwen2.5-VL's ``blocks``, Mllama's ``transformer.layers`` then
``global_transformer.layers``) come first, then the language model's layers: the order data
flows through the model, the encoders running before the language model (vision, then audio).
Positions 0..V-1 are the towers' blocks.

A layer without adapter modules whose own weights are trainable is a *full layer*
(LISA-style sparse tuning of whole blocks); :func:`prepare_full_layer_tuning` makes a
plain model ready for that.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from istune.config import TOWER_CHOICES


@dataclass
class AdapterLayer:
    """One decoder layer as IST sees it.

    Attributes:
        index: position of the block in the model's layer list (with ``towers="select"``, in the towers'
            block lists followed by the language model's: :func:`block_lists`).
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


def find_adapter_layers(model: nn.Module, layers_path: str | None = None,
                        towers: str = "train") -> list[AdapterLayer]:
    """List the decoder layers that hold trainable parameters, in model order.

    The trainable parameters are read from ``requires_grad`` now, so call this before
    anything freezes them. Layers without any trainable parameter (e.g. peft's
    ``layers_to_transform``) are left out: N_L counts the layers that hold adapters.

    Args:
        model: the model, under peft or not.
        layers_path: the dotted name of the language model's layer list; found when None.
        towers: ``"train"``: the language model's layers only (a vision tower's adapters are
            outside them and train at every step); ``"select"``: each modality tower's blocks that
            hold trainable parameters first (:func:`tower_block_lists`), then the language model's.

    Raises:
        ValueError: no layer list was found, no layer holds a trainable parameter, a trainable
            parameter is shared by several layers (it cannot train in one layer and stay frozen in
            another), or ``towers="select"`` on a model without a tower whose blocks hold
            trainable parameters.
    """
    if towers not in TOWER_CHOICES:
        raise ValueError(f"towers={towers!r} is invalid: use one of {', '.join(map(repr, TOWER_CHOICES))}.")
    path, blocks = layer_list(model, layers_path)
    lists = [*tower_block_lists(model, path), (path, blocks)] if towers == "select" else [(path, blocks)]
    layers, offset = [], 0
    for list_path, list_blocks in lists:
        for position, block in enumerate(list_blocks):
            adapters = [m for m in block.modules() if is_adapter_module(m)]
            named = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
            if named:
                layers.append(AdapterLayer(offset + position, f"{list_path}.{position}", adapters,
                                           [p for _, p in named], block=block, parameter_names=[n for n, _ in named]))
        offset += len(list_blocks)
    if not layers:
        raise _nothing_trainable(model, path, blocks, given=layers_path is not None)
    _refuse_shared_parameters(layers)
    return layers


def tower_block_lists(model: nn.Module, language_path: str) -> list[tuple[str, nn.ModuleList]]:
    """The block lists of ``model``'s modality towers that hold trainable parameters, with their dotted names,
    in data-flow order: tower by tower as :func:`modality_towers` names them (vision, then audio), in each its
    outermost lists (``nn.ModuleList``) in the order the tower registers them (Mllama: ``transformer.layers``, then
    ``global_transformer.layers``). What ``towers="select"`` adds before the language model's layers.

    Args:
        language_path: the dotted name of the language model's layer list (it must lie outside every tower).

    Raises:
        ValueError: the model has no tower, no tower block holds a trainable parameter, or
            ``language_path`` lies inside a tower.
    """
    towers = modality_towers(model)
    if not towers:
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        raise ValueError(f"ISTConfig.towers='select' asks for a vision or audio tower's blocks to join the "
                         f"layers IST chooses from, but {type(base).__name__} has none (transformers' "
                         "get_encoder(modality='image' or 'audio') names no tower). For a text model use "
                         "towers='train' (the default); for a multimodal model whose tower is not found, set "
                         "layers_path to the one list to select from.")
    found, seen = [], []
    for what, tower_path in towers.items():
        if language_path == tower_path or language_path.startswith(f"{tower_path}."):
            raise ValueError(f"ISTConfig.layers_path={language_path!r} names a list inside the {what} "
                             f"('{tower_path}'), whose blocks towers='select' adds already; leave layers_path "
                             "unset (or name the language model's layer list), or use towers='train'.")
        tower = model.get_submodule(tower_path)
        outermost = []
        for name, module in tower.named_modules():  # parents before children: the outermost lists come first
            if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in outermost):
                outermost.append(name)
                adapters = sum(map(is_adapter_module, module.modules()))
                seen.append(f"'{tower_path}.{name}' ({_contents(module, adapters)})")
                if any(p.requires_grad for p in module.parameters()):
                    found.append((f"{tower_path}.{name}", module))
    if not found:
        names = ", ".join(f"the {what} ('{path}')" for what, path in towers.items())
        raise ValueError(f"ISTConfig.towers='select': no block of {names} holds a trainable parameter (its "
                         f"block lists: {', '.join(seen) or 'none'}). Put adapters on the tower's blocks (e.g. peft "
                         "LoRA with target_modules='all-linear'), or use towers='train'.")
    return found


def block_lists(model: nn.Module, layers: list[AdapterLayer]) -> list[tuple[str, nn.ModuleList]]:
    """The block lists ``layers`` come from, in order, with their dotted names: one list (the language model's)
    or, with ``towers="select"``, the towers' lists then the language model's. ``layer.index`` is the
    position of its block in these lists end to end."""
    paths = list(dict.fromkeys(layer.name.rsplit(".", 1)[0] for layer in layers))
    return [(path, model.get_submodule(path)) for path in paths]


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
        layers_path = _discover(model, key=lambda c: c.weights)[0]
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
    """The decoder layer list of ``model`` and its dotted name, found in this order:

    1. ``layers_path``, if given;
    2. the language model's own list, as the model describes it (:func:`language_model_layers`);
    3. the ``nn.ModuleList`` holding the most adapter modules, then trainable parameters (models without a
       transformers config).

    Raises:
        ValueError: ``layers_path`` names no non-empty list, or the model holds no ``nn.ModuleList`` at all.
    """
    if layers_path is not None:
        return layers_path, _named_list(model, layers_path)
    return _discover(model, key=lambda c: (c.adapters, c.trainable))


def language_model_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The language model's decoder layer list and its dotted name, asked of the model; None if it cannot say.

    The list is the ``nn.ModuleList`` inside ``get_decoder()`` (a VLM's language model, never its vision
    tower) whose length is the text config's ``num_hidden_layers``; of several, the one with the most weights.
    Its blocks may be of several classes (Jamba: attention and Mamba; Mllama: self- and cross-attention).
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under peft
    config = getattr(base, "config", None)
    try:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    except (AttributeError, NotImplementedError, ValueError):  # exotic models with no rule for these
        return None
    count = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(count, int) or not isinstance(decoder, nn.Module):
        return None
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count > 0]
    if not lists:
        return None
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return next(((name, m) for name, m in model.named_modules() if m is blocks), None)


def trainable_outside_layers(model: nn.Module, layers: list[AdapterLayer]) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` outside ``layers``, by name: IST never freezes them, so they train
    at every step (LISA-style embeddings or head, a vision tower's adapters, ...)."""
    inside = {id(p) for layer in layers for p in layer.parameters}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside}


def modality_towers(model: nn.Module) -> dict[str, str]:
    """The dotted names of a multimodal model's encoders of other modalities, e.g. ``{"vision tower":
    "base_model.model.model.vision_model"}`` (transformers' ``get_encoder(modality=...)``); empty for a text model."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under peft
    if not hasattr(base, "get_encoder"):
        return {}
    names = {id(m): name for name, m in model.named_modules()}
    towers = {}
    for modality, what in (("image", "vision tower"), ("audio", "audio tower")):
        try:
            tower = base.get_encoder(modality=modality)
        except (AttributeError, NotImplementedError, ValueError, TypeError):  # older signatures, no rule
            continue
        if tower is not base and tower is not getattr(base, "base_model", None) and id(tower) in names:
            towers[what] = names[id(tower)]
    return towers


class _Candidate(NamedTuple):
    path: str
    blocks: nn.ModuleList | nn.Sequential
    adapters: int  # adapter modules inside
    trainable: int  # trainable parameter tensors inside
    weights: int  # parameter elements inside


def _discover(model: nn.Module, key: Callable[[_Candidate], Any]) -> tuple[str, nn.ModuleList]:
    """The language model's list if the model says which, else the ModuleList that ``key`` ranks highest."""
    found = language_model_layers(model)
    if found is not None:
        return found
    candidates = _candidates(model)
    if not candidates:
        seen = _candidates(model, sequential=True)
        example = f" (e.g. layers_path='{max(seen, key=lambda c: c.weights).path}')" if seen else ""
        raise ValueError(
            f"No list of decoder layers found in {type(model).__name__}: no nn.ModuleList, and no config "
            f"num_hidden_layers to match one; lists seen: {_candidate_summary(model, sequential=True)}; set "
            f"ISTConfig.layers_path to the dotted name of the ModuleList or Sequential of decoder blocks{example}."
        )
    best = max(candidates, key=key)
    return best.path, best.blocks


def _nothing_trainable(model: nn.Module, path: str, blocks: nn.Module, given: bool) -> ValueError:
    """The error for a layer list without trainable parameters: the lists that have them, or what to add."""
    contents = _contents(blocks, sum(is_adapter_module(m) for m in blocks.modules()))
    others = [c for c in _candidates(model) if c.trainable and c.path != path]
    listed = ", ".join(_describe(c) for c in others[:8])
    if given and others:
        return ValueError(f"ISTConfig.layers_path={path!r} names a layer list with no trainable adapters ({contents});"
                          f" the layer lists that have them: {listed}. Set layers_path to one of those, or add "
                          f"adapters to '{path}'.")
    if others:
        return ValueError(f"No trainable parameters inside the language model's decoder layers '{path}' ({contents});"
                          f" the layer lists that have them: {listed}. Add adapters to the decoder layers (e.g. peft "
                          f"LoRA with target_modules='all-linear'), or set ISTConfig.layers_path='{others[0].path}' "
                          "to sparse-tune that list instead.")
    return ValueError(
        f"{f'ISTConfig.layers_path={path!r}: ' if given else ''}No adapter modules or trainable parameters inside "
        f"any layer list of {type(model).__name__}: found {_candidate_summary(model)}; trainable parameters: "
        f"{_trainable_summary(model)}. Wrap the model with peft (get_peft_model) or istune's adapters first, or "
        "call istune.core.layers.prepare_full_layer_tuning(model) to tune whole layers. Prompt-based tuners "
        "(prompt, prefix, p-tuning) keep their parameters outside the layers and cannot be used."
    )


def _named_list(model: nn.Module, layers_path: str) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(layers_path)
    except AttributeError as error:
        raise ValueError(f"ISTConfig.layers_path={layers_path!r} names no module of this model ({error}); "
                         f"candidate layer lists: {_candidate_summary(model)}") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"ISTConfig.layers_path={layers_path!r} is a {type(blocks).__name__}, not a non-empty "
                         f"nn.ModuleList of decoder layers; candidate layer lists: {_candidate_summary(model)}")
    return blocks


def _candidates(model: nn.Module, sequential: bool = False) -> list[_Candidate]:
    """Every non-empty ModuleList (and nn.Sequential, if asked) with what it holds, in model order."""
    kinds = (nn.ModuleList, nn.Sequential) if sequential else nn.ModuleList
    found = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and len(module) > 0:
            parameters = list(module.parameters())
            found.append(_Candidate(name, module, sum(is_adapter_module(m) for m in module.modules()),
                                    sum(p.requires_grad for p in parameters), sum(p.numel() for p in parameters)))
    return found


def _describe(candidate: _Candidate) -> str:
    """``'model.layers' (2x LlamaDecoderLayer, 0 adapters)``; a list of several block classes counts each."""
    return f"'{candidate.path}' ({_contents(candidate.blocks, candidate.adapters)})"


def _contents(blocks: nn.Module, adapters: int) -> str:
    counts = Counter(type(block).__name__ for block in blocks)
    return " + ".join(f"{n}x {name}" for name, n in counts.items()) + f", {adapters} adapters"


def _candidate_summary(model: nn.Module, sequential: bool = False, limit: int = 8) -> str:
    found = [_describe(c) for c in _candidates(model, sequential)]
    return ", ".join(found[:limit]) + (f" and {len(found) - limit} more" if len(found) > limit else "") or "none"


def _trainable_summary(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
