"""Physical slicing: cut the pruned rows/columns out of the weights and drop removed layers.

For every kept layer: q/k/v rows and o_proj columns of the kept attention units, gate/up rows
and down_proj columns of the kept MLP channels. Dropped layers are deleted and ``layer_idx``
renumbered so the KV cache indexes the new layers. The config is fixed up: a uniform result
becomes a stock config (``AutoModelForCausalLM`` loads it with no extra code), a per-layer
result records ``dms_layer_shapes`` and points ``auto_map`` at the modeling file saved beside it.

Example:
    >>> arch = masks.architecture(); masks.remove()      # doctest: +SKIP
    >>> slice_model(model, arch)                          # doctest: +SKIP
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import FamilyAdapter, get_adapter
from .architecture import Architecture
from .errors import DMSError
from .modeling_dms_pruned import PRUNED_CLASSES

MODELING_FILE = "modeling_dms_pruned.py"


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only the kept rows/columns.

    The selected tensors become the new parameters as they are (the module is built on the meta
    device, so nothing is allocated twice); once the caller swaps it in, the original is freed.
    Peak memory of slicing is therefore the model plus one projection's kept part.
    """
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(weight.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    with torch.device("meta"):
        sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    sliced.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        sliced.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return sliced


def _expand(units: list[int], width: int) -> torch.Tensor:
    """Indices of the rows belonging to ``units`` when each unit is ``width`` rows wide."""
    base = torch.tensor(units, dtype=torch.long).unsqueeze(1) * width
    return (base + torch.arange(width)).flatten()


def _check(arch: Architecture, units: list[int], channels: list[int]) -> None:
    if arch.num_layers != len(units):
        raise DMSError(f"architecture has {arch.num_layers} layers but the model has {len(units)}")
    if not arch.kept_layers:
        raise DMSError("the architecture keeps no decoder layer")
    for i in arch.kept_layers:
        if not arch.kept_units[i] or not arch.kept_channels[i]:
            raise DMSError(f"layer {i} keeps no attention unit or no MLP channel; drop the layer instead")
        if max(arch.kept_units[i]) >= units[i] or max(arch.kept_channels[i]) >= channels[i]:
            raise DMSError(f"architecture indexes past the size of layer {i}")


def slice_model(
    model: nn.Module, arch: Architecture, layout: str = "per_layer", adapter: FamilyAdapter | None = None
) -> nn.Module:
    """Slice ``model`` in place to ``arch`` and fix its config; returns the model.

    ``layout="uniform"`` requires the same kept counts in every layer and produces a stock
    config; ``"per_layer"`` allows different counts (a uniform result is still saved stock).
    """
    adapter = adapter or get_adapter(model.config)
    geometry = check_slicing(model, arch, layout, adapter)
    layers = adapter.decoder_layers(model)
    for index in arch.kept_layers:
        slice_layer(layers[index], index, arch, geometry, adapter)
    return finish_slicing(model, arch, geometry, adapter)


def check_slicing(model: nn.Module, arch: Architecture, layout: str, adapter: FamilyAdapter):
    """The model's geometry, once ``arch`` is known to fit it in ``layout`` (else a clear error)."""
    geometry = adapter.geometry(model)
    _check(arch, geometry.units, geometry.channels)
    if layout not in ("uniform", "per_layer"):
        raise DMSError(f"unknown layout {layout!r}; use 'per_layer' or 'uniform'")
    if layout == "uniform" and not arch.is_uniform:
        raise DMSError("--layout uniform needs the same kept heads and channels in every layer")
    if layout == "uniform" and not stock_config_accepts(
        model.config, arch.unit_counts()[0], arch.channel_counts()[0], geometry.group_size, geometry.head_dim
    ):
        raise DMSError(
            f"--layout uniform: {arch.unit_counts()[0] * geometry.group_size} attention heads cannot be saved as a "
            f"stock {type(model.config).__name__} by this transformers version (it needs hidden_size divisible by "
            "the head count); use the per_layer layout or another head count"
        )
    return geometry


@torch.no_grad()
def slice_layer(layer: nn.Module, index: int, arch: Architecture, geometry, adapter: FamilyAdapter) -> None:
    """Cut decoder layer ``index`` (kept by ``arch``) down to its kept attention units and MLP channels."""
    q_width = geometry.group_size * geometry.head_dim
    q_rows = _expand(arch.kept_units[index], q_width)
    kv_rows = _expand(arch.kept_units[index], geometry.head_dim)
    channels = torch.tensor(arch.kept_channels[index], dtype=torch.long)
    for name, rows, cols in (
        ("q", q_rows, None),
        ("k", kv_rows, None),
        ("v", kv_rows, None),
        ("o", None, q_rows),
        ("gate", channels, None),
        ("up", channels, None),
        ("down", None, channels),
    ):
        adapter.set_projection(layer, name, _slice_linear(adapter.projection(layer, name), rows, cols))


def finish_slicing(model: nn.Module, arch: Architecture, geometry, adapter: FamilyAdapter) -> nn.Module:
    """Once every kept layer is sliced: drop the other layers, renumber the KV-cache indices and fix
    the config (``geometry``: the model's before slicing, from ``check_slicing``)."""
    layers = adapter.decoder_layers(model)
    kept = nn.ModuleList([layers[i] for i in arch.kept_layers])
    for new_index, layer in enumerate(kept):
        attention = adapter.attention_of(layer)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    parent_path, _, child = adapter.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, kept)
    _fix_config(model, arch, adapter, geometry.group_size, geometry.head_dim)
    return model


def stock_unit_counts(config, geometry) -> list[int]:
    """The shared attention-unit counts a uniform layout can be saved with as the family's stock config."""
    g = geometry
    units = range(1, g.units[0] + 1)
    return [k for k in units if stock_config_accepts(config, k, g.channels[0], g.group_size, g.head_dim)]


def stock_config_accepts(config, units: int, channels: int, group_size: int, head_dim: int) -> bool:
    """Whether the family's own config class accepts these uniform sizes.

    transformers 5's ``LlamaConfig`` rejects ``hidden_size % num_attention_heads != 0`` even with
    an explicit ``head_dim`` (transformers issue #46082), so some head counts cannot be saved as a
    stock Llama config; they are written in the per-layer format instead.
    """
    trial = copy.deepcopy(config)
    trial.num_key_value_heads, trial.num_attention_heads = units, units * group_size
    trial.intermediate_size, trial.head_dim = channels, head_dim
    try:
        type(config).from_dict(trial.to_dict())
    except Exception:  # any validation error means "not loadable as a stock config"
        return False
    return True


def _fix_config(model: nn.Module, arch: Architecture, adapter: FamilyAdapter, group_size: int, head_dim: int) -> None:
    config = model.config
    for name in adapter.per_layer_config_lists:
        values = getattr(config, name, None)
        if values is not None:
            setattr(config, name, [values[i] for i in arch.kept_layers])
    units, channels = arch.unit_counts(), arch.channel_counts()
    config.num_hidden_layers = len(arch.kept_layers)
    config.head_dim = head_dim
    stock = arch.is_uniform and stock_config_accepts(config, units[0], channels[0], group_size, head_dim)
    if stock:
        config.num_key_value_heads = units[0]
        config.num_attention_heads = units[0] * group_size
        config.intermediate_size = channels[0]
        for stale in ("dms_layer_shapes", "auto_map"):
            if hasattr(config, stale):
                delattr(config, stale)
        if type(model) in PRUNED_CLASSES.values():
            model.__class__ = type(model).__mro__[1]  # back to the stock family class
        return
    # Per-layer format: the config keeps its original (valid) head counts and MLP width as the
    # base the modeling file builds before resizing each layer to its ``dms_layer_shapes`` entry.
    config.dms_layer_shapes = [{"num_key_value_heads": u, "intermediate_size": c} for u, c in zip(units, channels)]
    pruned_class = PRUNED_CLASSES[adapter.model_type]
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{pruned_class.__name__}"}
    # the in-memory model becomes the class that will load it, so save_pretrained records it
    model.__class__ = pruned_class
