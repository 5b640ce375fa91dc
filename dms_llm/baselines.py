"""One-shot pruning criteria of the peer methods, on the same units, slicing and budget as DMS.

Each method scores the same units DMS prunes (KV-group attention units, MLP channels, decoder
layers), allocates them with its paper's rule and lands on the budget through the same
``refit.fit_counts``; only the choice of what to keep differs.

| method      | score                                                   | allocation                       |
|-------------|---------------------------------------------------------|----------------------------------|
| magnitude   | sum of squared weights of the unit                      | same ratio in every layer        |
| taylor      | LLM-Pruner: sum over the unit of abs(w * dL/dw)         | same ratio in every layer        |
| flap        | FLAP: input variance x squared column norm, per-layer   | global over heads and channels,  |
|             | standardised; bias compensation where biases exist      | (FLAP's AL-AM structure)         |
| minitron    | NVIDIA Minitron: activation magnitude of the unit's     | same ratio in every layer, every |
|             | o_proj / down_proj inputs (mean |x| over positions,     | layer kept (its width pruning,   |
|             | L2 over sequences; a unit's L2 over its features)       | which it prefers to depth)       |
| shortgpt    | ShortGPT: block influence 1 - cos(h_in, h_out)          | drop whole layers, then channels |
|             |                                                         | by magnitude for the remainder   |
| random      | uniform random                                          | same ratio in every layer        |

Example:
    >>> result = one_shot(model, "flap", counter, budget, calib_blocks)     # doctest: +SKIP
    >>> slice_model(model, result.architecture)                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapters import FamilyAdapter, LayerGeometry, get_adapter
from .architecture import Architecture
from .budget import Budget, ParamCounter
from .config import METHODS as ALL_METHODS
from .errors import DMSError, did_you_mean
from .refit import count_params, fit_counts

METHODS = ALL_METHODS[1:]  # the peers (the first is dms itself)


@dataclass
class OneShotResult:
    architecture: Architecture
    params: int
    compensate: Callable[[nn.Module], None] | None = None  # bias update to apply before slicing
    info: dict = field(default_factory=dict)


def _unit_rows(geometry: LayerGeometry, width: int) -> Callable[[Tensor], Tensor]:
    """Sum a per-row (or per-column) vector into one value per attention unit."""
    return lambda values: values.reshape(-1, width).sum(dim=-1)


def _weight_scores(model: nn.Module, adapter: FamilyAdapter, element: Callable[[nn.Linear], Tensor]):
    """Per-layer unit and channel scores from an element-wise score of each projection's weight."""
    geometry = adapter.geometry(model)
    q_width = geometry.group_size * geometry.head_dim
    heads, channels = [], []
    for layer in adapter.decoder_layers(model):
        q, k, v, o = (element(adapter.projection(layer, n)) for n in "qkvo")
        unit = _unit_rows(geometry, q_width)(q.sum(1)) + _unit_rows(geometry, q_width)(o.sum(0))
        unit += _unit_rows(geometry, geometry.head_dim)(k.sum(1) + v.sum(1))
        gate, up, down = (element(adapter.projection(layer, n)) for n in ("gate", "up", "down"))
        heads.append(unit)
        channels.append(gate.sum(1) + up.sum(1) + down.sum(0))
    return heads, channels


@torch.no_grad()
def magnitude_scores(model: nn.Module, adapter: FamilyAdapter):
    return _weight_scores(model, adapter, lambda lin: lin.weight.detach().float().pow(2))


def taylor_scores(model: nn.Module, adapter: FamilyAdapter, blocks: Tensor, batch_size: int = 8):
    """LLM-Pruner's element-wise first-order Taylor score, gradient summed over the blocks."""
    device = model.get_input_embeddings().weight.device
    requires = {p: p.requires_grad for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        scores = _weight_scores(model, adapter, lambda lin: (lin.weight.detach() * lin.weight.grad).float().abs())
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return scores


@torch.no_grad()
def _projection_inputs(
    model: nn.Module, adapter: FamilyAdapter, blocks: Tensor, batch_size: int, accumulate: Callable
) -> None:
    """Run the blocks, handing every o_proj and down_proj input to ``accumulate((layer, name), x)``.

    ``x`` is (batch, positions, features), detached.
    """
    device = model.get_input_embeddings().weight.device
    handles = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name in ("o", "down"):

            def hook(module, args, key=(index, name)):
                accumulate(key, args[0].detach())

            handles.append(adapter.projection(layer, name).register_forward_pre_hook(hook))
    try:
        for start in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def fluctuation_statistics(model: nn.Module, adapter: FamilyAdapter, blocks: Tensor, batch_size: int = 8):
    """Per-input-channel mean and variance of every o_proj and down_proj input over the blocks."""
    stats: dict[tuple[int, str], list] = {}

    def accumulate(key, x: Tensor) -> None:
        x = x.double().reshape(-1, x.shape[-1])
        entry = stats.setdefault(key, [0, 0.0, 0.0])
        entry[0] += x.shape[0]
        entry[1] = entry[1] + x.sum(0)
        entry[2] = entry[2] + x.pow(2).sum(0)

    _projection_inputs(model, adapter, blocks, batch_size, accumulate)
    result = {}
    for key, (count, total, squares) in stats.items():
        mean = total / count
        variance = (squares - count * mean.pow(2)) / (count - 1)
        result[key] = (mean.float(), variance.clamp(min=0).float())
    return result


def activation_norms(model: nn.Module, adapter: FamilyAdapter, blocks: Tensor, batch_size: int = 8):
    """Minitron's activation importance of every o_proj and down_proj input feature.

    Per feature: the mean absolute activation over each sequence's positions, then the L2 norm of
    those means over the sequences (the (L2, mean) aggregation the Minitron paper found best).
    """
    squares: dict[tuple[int, str], Tensor] = {}

    def accumulate(key, x: Tensor) -> None:
        per_sequence = x.double().abs().mean(dim=1)  # (batch, features)
        squares[key] = squares.get(key, 0.0) + per_sequence.pow(2).sum(0)

    _projection_inputs(model, adapter, blocks, batch_size, accumulate)
    return {key: total.sqrt().float() for key, total in squares.items()}


def minitron_scores(model: nn.Module, adapter: FamilyAdapter, norms: dict):
    """A KV-group unit scores the L2 norm of its query heads' features; a channel its own norm."""
    geometry = adapter.geometry(model)
    q_width = geometry.group_size * geometry.head_dim
    heads = [norms[(index, "o")].reshape(-1, q_width).norm(dim=-1) for index in range(geometry.num_layers)]
    channels = [norms[(index, "down")] for index in range(geometry.num_layers)]
    return heads, channels


def _standardize(values: Tensor) -> Tensor:
    return (values - values.mean()) / values.std().clamp(min=1e-12)


def flap_scores(model: nn.Module, adapter: FamilyAdapter, statistics: dict):
    """FLAP's weighted input feature variance, standardised per layer (its AL-AM structure)."""
    geometry = adapter.geometry(model)
    q_width = geometry.group_size * geometry.head_dim
    heads, channels = [], []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        o, down = adapter.projection(layer, "o"), adapter.projection(layer, "down")
        o_metric = statistics[(index, "o")][1] * o.weight.detach().float().pow(2).sum(0)
        down_metric = statistics[(index, "down")][1] * down.weight.detach().float().pow(2).sum(0)
        heads.append(_standardize(o_metric).reshape(-1, q_width).mean(-1))
        channels.append(_standardize(down_metric))
    return heads, channels


@torch.no_grad()
def block_influence(model: nn.Module, adapter: FamilyAdapter, blocks: Tensor, batch_size: int = 8) -> Tensor:
    """ShortGPT's block influence of every layer: 1 - mean cosine(input, output) over tokens."""
    device = model.get_input_embeddings().weight.device
    layers = adapter.decoder_layers(model)
    totals, count = torch.zeros(len(layers), dtype=torch.float64), 0
    handles = []
    for index, layer in enumerate(layers):

        def hook(module, args, kwargs, output, index=index):
            hidden_in = (args[0] if args else kwargs["hidden_states"]).float()
            hidden_out = (output[0] if isinstance(output, tuple) else output).float()
            cosine = torch.nn.functional.cosine_similarity(hidden_in, hidden_out, dim=-1)
            totals[index] += float((1.0 - cosine).sum())

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (totals / count).float()


def _random_scores(geometry: LayerGeometry, seed: int):
    generator = torch.Generator().manual_seed(seed)
    heads = [torch.rand(u, generator=generator) for u in geometry.units]
    channels = [torch.rand(c, generator=generator) for c in geometry.channels]
    return heads, channels


def _architecture(geometry: LayerGeometry, kept_layers, counts, heads, channels) -> Architecture:
    """Keep the ``counts`` highest-scoring units/channels of every layer."""

    def top(scores: Tensor, k: int) -> list[int]:
        return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())

    base = Architecture.dense(geometry.units, geometry.channels)
    return Architecture(
        num_layers=base.num_layers,
        kept_layers=sorted(kept_layers),
        kept_units=[top(s, k) for s, k in zip(heads, counts["heads"])],
        kept_channels=[top(s, k) for s, k in zip(channels, counts["channels"])],
        original_units=base.original_units,
        original_channels=base.original_channels,
    )


def _land(
    counter, budget, geometry, kept_layers, heads, channels, uniform: bool, allowed_units=None
) -> tuple[Architecture, int]:
    """Land on the budget: one shared ratio for heads and channels, or one global ranking.

    ``allowed_units``: the shared head counts a ``--layout uniform`` checkpoint can be saved with.
    """
    wants = {  # the k-th best score of a layer: how strongly its k-th element is wanted
        "heads": [s.sort(descending=True).values for s in heads],
        "channels": [s.sort(descending=True).values for s in channels],
    }
    counts = {"heads": list(geometry.units), "channels": list(geometry.channels)}
    if uniform:
        # LLM-Pruner style: the same prune ratio for heads and channels in every layer, the
        # largest that stays at or over the target, then channels land the remainder
        ratio = 0.0
        for step in range(1, 101):
            trial = step / 100
            units = [max(1, round(u * (1 - trial))) for u in geometry.units]
            chans = [max(1, round(c * (1 - trial))) for c in geometry.channels]
            if count_params(counter, kept_layers, {"heads": units, "channels": chans}) < budget.target:
                break
            ratio = trial
        counts = {
            "heads": [max(1, round(u * (1 - ratio))) for u in geometry.units],
            "channels": [max(1, round(c * (1 - ratio))) for c in geometry.channels],
        }
    fitted = fit_counts(
        counter,
        budget,
        kept_layers,
        counts,
        wants,
        ["channels", "heads"],
        uniform=uniform,
        allowed_units=allowed_units if uniform else None,
        joint=not uniform,
    )
    if fitted is None:
        raise DMSError("the budget cannot be reached with the layers kept")
    return _architecture(geometry, kept_layers, fitted, heads, channels), count_params(counter, kept_layers, fitted)


def one_shot(
    model: nn.Module,
    method: str,
    counter: ParamCounter,
    budget: Budget,
    blocks: Tensor,
    seed: int = 0,
    adapter: FamilyAdapter | None = None,
    allowed_units: list[int] | None = None,
) -> OneShotResult:
    """The architecture a peer method's criterion keeps at this budget (weights untouched).

    ``allowed_units``: for ``--layout uniform``, the shared head counts the stock config accepts
    (``slicing.stock_unit_counts``); the methods that allocate the same shape to every layer keep to them.
    """
    if method not in METHODS:
        raise DMSError(f"unknown method {method!r}." + did_you_mean(method, METHODS))
    adapter = adapter or get_adapter(model.config)
    geometry = adapter.geometry(model)
    all_layers = list(range(geometry.num_layers))
    if method == "random":
        heads, channels = _random_scores(geometry, seed)
        arch, params = _land(counter, budget, geometry, all_layers, heads, channels, True, allowed_units)
        return OneShotResult(arch, params)
    if method == "magnitude":
        heads, channels = magnitude_scores(model, adapter)
        arch, params = _land(counter, budget, geometry, all_layers, heads, channels, True, allowed_units)
        return OneShotResult(arch, params)
    if method == "taylor":
        heads, channels = taylor_scores(model, adapter, blocks)
        arch, params = _land(counter, budget, geometry, all_layers, heads, channels, True, allowed_units)
        return OneShotResult(arch, params)
    if method == "minitron":
        heads, channels = minitron_scores(model, adapter, activation_norms(model, adapter, blocks))
        arch, params = _land(counter, budget, geometry, all_layers, heads, channels, True, allowed_units)
        return OneShotResult(arch, params)
    if method == "flap":
        statistics = fluctuation_statistics(model, adapter, blocks)
        heads, channels = flap_scores(model, adapter, statistics)
        arch, params = _land(counter, budget, geometry, all_layers, heads, channels, uniform=False)
        return OneShotResult(arch, params, _flap_compensation(adapter, arch, statistics, geometry))
    # shortgpt: drop the least influential layers while the model stays over the target
    influence = block_influence(model, adapter, blocks)
    kept = list(all_layers)
    for layer in torch.argsort(influence).tolist():
        trial = [i for i in kept if i != layer]
        if len(trial) == 0 or count_params(counter, trial, {}) < budget.target:
            break
        kept = trial
    heads, channels = magnitude_scores(model, adapter)
    arch, params = _land(counter, budget, geometry, kept, heads, channels, True, allowed_units)
    return OneShotResult(arch, params, info={"block_influence": influence.tolist()})


def _flap_compensation(adapter, arch, statistics, geometry):
    """FLAP's bias compensation: output bias += W[:, pruned] @ mean(input[pruned]), where a bias exists."""

    def compensate(model: nn.Module) -> None:
        q_width = geometry.group_size * geometry.head_dim
        with torch.no_grad():
            for index in arch.kept_layers:
                layer = adapter.decoder_layers(model)[index]
                for name, kept in (("o", arch.kept_units[index]), ("down", arch.kept_channels[index])):
                    linear = adapter.projection(layer, name)
                    if linear.bias is None:
                        continue
                    keep = torch.zeros(linear.in_features, dtype=torch.bool)
                    width = q_width if name == "o" else 1
                    for element in kept:
                        keep[element * width : (element + 1) * width] = True
                    mean = statistics[(index, name)][0].to(linear.weight.device, linear.weight.dtype)
                    linear.bias += linear.weight[:, ~keep] @ mean[~keep]

    return compensate
