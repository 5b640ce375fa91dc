"""Parameter accounting: exact counts of a (masked) model and the pruning target.

Every decoder layer's parameter count is affine in what it keeps:
``fixed + units * unit_cost + channels * channel_cost``, with the costs read off the module
shapes (biases included), so one formula serves Llama, Mistral and Qwen2. The differentiable
count of the masked model uses straight-through counts: its value is the exact ``numel()`` of
the model the hard masks slice to, its gradient flows through the soft masks.

Example:
    >>> counter = ParamCounter.from_model(model, adapter)          # doctest: +SKIP
    >>> budget = resolve_budget(counter, ratio=0.2)                 # doctest: +SKIP
    >>> budget.target <= 0.8 * counter.total                        # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import FamilyAdapter
from .architecture import Architecture
from .errors import DMSError

# the final model must land at or under the target and no further below it than this
BUDGET_TOLERANCE = 0.005


def _linear_params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


@dataclass(frozen=True)
class LayerCost:
    """Parameter count of one decoder layer as a function of what it keeps."""

    fixed: int  # norms, output biases: independent of the kept units/channels
    unit_cost: int  # one attention unit: a KV head with its query heads (q, k, v rows, o columns)
    channel_cost: int  # one MLP channel (gate, up rows and down column)
    units: int
    channels: int

    def params(self, units: float | Tensor, channels: float | Tensor) -> float | Tensor:
        return self.fixed + units * self.unit_cost + channels * self.channel_cost


@dataclass(frozen=True)
class ParamCounter:
    """Exact parameter accounting of a Llama-family model, per layer."""

    total: int  # sum of numel over model.parameters() (tied weights once)
    embedding: int  # input embedding + untied lm_head
    outside_layers: int  # everything not in a decoder layer (embeddings, final norm, lm_head)
    layers: tuple[LayerCost, ...]

    @classmethod
    def from_model(cls, model: nn.Module, adapter: FamilyAdapter) -> ParamCounter:
        total = sum(p.numel() for p in model.parameters())
        geometry = adapter.geometry(model)
        layers = []
        for layer, units, channels in zip(adapter.decoder_layers(model), geometry.units, geometry.channels):
            q, k, v, o = (adapter.projection(layer, n) for n in "qkvo")
            gate, up, down = (adapter.projection(layer, n) for n in ("gate", "up", "down"))
            unit_cost = sum(_linear_params(lin) // units for lin in (q, k, v))
            unit_cost += o.weight.numel() // units
            channel_cost = sum(_linear_params(lin) // channels for lin in (gate, up))
            channel_cost += down.weight.numel() // channels
            layer_total = sum(p.numel() for p in layer.parameters())
            fixed = layer_total - units * unit_cost - channels * channel_cost
            layers.append(LayerCost(fixed, unit_cost, channel_cost, units, channels))
        outside = total - sum(c.params(c.units, c.channels) for c in layers)
        embedding = model.get_input_embeddings().weight.numel()
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            embedding += output.weight.numel()
        return cls(total, embedding, outside, tuple(layers))

    def grouped_channels(self, multiple: int) -> ParamCounter:
        """The same accounting with MLP channels counted in groups of ``multiple`` (whole groups only)."""
        from dataclasses import replace

        layers = tuple(
            replace(c, channel_cost=c.channel_cost * multiple, channels=c.channels // multiple) for c in self.layers
        )
        return replace(self, layers=layers)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def count(self, arch: Architecture) -> int:
        """Exact parameter count of the model an architecture slices to."""
        return self.outside_layers + sum(
            self.layers[i].params(len(arch.kept_units[i]), len(arch.kept_channels[i])) for i in arch.kept_layers
        )

    def count_masked(self, layer_keep: Tensor, units: Tensor, channels: Tensor) -> Tensor:
        """Differentiable count from per-layer (straight-through) keep values, in float64.

        ``layer_keep``, ``units`` and ``channels`` are (L,) tensors; float64 keeps integer
        counts of up to 2**53 exact, so the value equals ``numel()`` of the sliced model.
        """
        fixed = torch.tensor([c.fixed for c in self.layers], dtype=torch.float64)
        unit_cost = torch.tensor([c.unit_cost for c in self.layers], dtype=torch.float64)
        channel_cost = torch.tensor([c.channel_cost for c in self.layers], dtype=torch.float64)
        device = units.device
        per_layer = fixed.to(device) + units * unit_cost.to(device) + channels * channel_cost.to(device)
        return self.outside_layers + (layer_keep.to(torch.float64) * per_layer).sum()

    def minimum(self, prune_layers: bool, prune_heads: bool, prune_channels: bool) -> int:
        """The smallest model reachable: one unit/channel per layer, one layer if layers prune."""
        per_layer = [c.params(1 if prune_heads else c.units, 1 if prune_channels else c.channels) for c in self.layers]
        kept = min(per_layer) if prune_layers else sum(per_layer)
        return self.outside_layers + kept


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_param_count(text: str | int | float) -> int:
    """Parse an absolute parameter count: ``5.4B``, ``250M``, ``180K`` or ``180000``."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not match:
        raise DMSError(f"cannot read parameter count {text!r}: use a number like 5.4B, 250M, 180K or 180000")
    return int(round(float(match.group(1)) * _SUFFIXES[match.group(2).upper()]))


@dataclass(frozen=True)
class Budget:
    """The resolved parameter target of a pruning run."""

    total: int
    target: int
    minimum: int

    @property
    def ratio(self) -> float:
        """Fraction of the total parameter count to remove."""
        return 1.0 - self.target / self.total

    @property
    def floor(self) -> int:
        """Lowest acceptable final size: the target minus the tolerance."""
        return self.target - math.floor(BUDGET_TOLERANCE * self.total)

    def target_at(self, step: int, decay_steps: int) -> float:
        """Target of the search at ``step``: exponential decay from the full size, then held."""
        if decay_steps <= 0 or step >= decay_steps:
            return float(self.target)
        return self.total * (self.target / self.total) ** (step / decay_steps)


def resolve_budget(
    counter: ParamCounter,
    ratio: float | None = None,
    params: str | int | None = None,
    targets: Sequence[str] = ("heads", "channels", "layers"),
) -> Budget:
    """Turn ``--ratio`` or ``--params`` into a parameter target, rejecting impossible ones."""
    if (ratio is None) == (params is None):
        raise DMSError("give exactly one of --ratio (fraction of parameters to remove) or --params (target size)")
    minimum = counter.minimum("layers" in targets, "heads" in targets, "channels" in targets)
    largest = 1.0 - minimum / counter.total
    if ratio is not None:
        if not 0.0 < float(ratio) < 1.0:
            raise DMSError(f"--ratio must be between 0 and 1 (the fraction of parameters to remove), got {ratio}")
        target = int(math.floor((1.0 - float(ratio)) * counter.total))
        asked = f"--ratio {ratio}"
    else:
        target = parse_param_count(params)
        if not 0 < target < counter.total:
            raise DMSError(f"--params {params} must be below the model's {counter.total:,} parameters and above 0")
        asked = f"--params {params}"
    if target < minimum:
        raise DMSError(
            f"{asked} cannot be reached: embeddings, norms and lm_head ({counter.outside_layers:,} params) are not "
            f"pruned and every kept layer keeps at least one attention unit and one channel; the largest reachable "
            f"ratio with targets {','.join(targets)} is {math.floor(largest * 1000) / 1000:.3f} "
            f"({minimum:,} params)"
        )
    return Budget(counter.total, target, minimum)


def budget_penalty(params: Tensor, target: float, weight: float) -> Tensor:
    """``weight * log(P / P_target)`` while the model is over the target, else zero."""
    ratio = params / target
    if float(ratio.detach()) <= 1.0:
        return params.new_zeros(()) + 0.0 * ratio
    return weight * torch.log(ratio)
