"""Discrete structure decisions of the search: the layer guard, head snapping, budget landing.

(Layer scores, the loss change when a layer is toggled, are measured in ``layer_scores``.)
- ``guard_layers``: a dropped layer stays dropped only if that costs less loss than keeping it and
  landing the budget with heads/channels instead ("never drop a layer that costs more than it saves").
- ``snap_uniform_heads``: uniform layout, move the shared head count to one the stock config loads.
- ``land``: the deterministic landing on the budget (see ``refit``).

Example:
    >>> arch, decisions = guard_layers(model, masks, counter, budget, blocks)   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from .architecture import Architecture
from .budget import Budget, ParamCounter
from .losses import SearchObjective
from .masks import MaskSet
from .refit import fit_counts


@torch.no_grad()
def hard_loss(
    model: nn.Module,
    masks: MaskSet,
    blocks: torch.Tensor,
    arch: Architecture | None = None,
    objective: SearchObjective | None = None,
) -> float:
    """Loss of the hard-masked model (of ``arch`` when given) on fixed blocks: the search's own
    ``objective``, or the mean NLL without one."""
    saved_frozen, saved_mode = dict(masks.frozen), masks.mode
    try:
        if arch is not None:
            masks.set_architecture(arch)
        masks.mode = "hard"
        masks.refresh()
        return (objective or SearchObjective()).mean(model, blocks)
    finally:
        masks.frozen, masks.mode = saved_frozen, saved_mode
        masks.deactivate()


def land(masks: MaskSet, counter: ParamCounter, budget: Budget, arch: Architecture) -> Architecture | None:
    """``arch`` with heads/channels adjusted (layers kept) to land on the budget, or None.

    Frozen heads may move here too: freezing keeps the structure stable while channels refine,
    it does not forbid the final landing from adding or removing a unit.
    """
    adjustable = [k for k in ("channels", "heads") if k in masks.targets]
    counts = masks.counts(arch)
    if masks.uniform:  # one shared count: a layer the guard restores may carry a stale one
        counts = {kind: [_shared_count(values, arch.kept_layers)] * len(values) for kind, values in counts.items()}
    counts = fit_grouped(
        masks,
        counter,
        budget,
        arch.kept_layers,
        counts,
        adjustable,
        uniform=masks.uniform,
        allowed_units=masks.allowed_units,
    )
    return None if counts is None else masks.architecture_for(arch.kept_layers, counts)


def _shared_count(values: list[int], kept_layers: list[int]) -> int:
    """The count most kept layers share (the larger one on a tie)."""
    kept = [values[i] for i in kept_layers] or values
    return max(set(kept), key=lambda value: (kept.count(value), value))


def fit_grouped(masks: MaskSet, counter: ParamCounter, budget: Budget, kept_layers, counts, adjustable, **options):
    """``fit_counts`` in the masks' own units: with ``channel_multiple = M`` a channel move is a
    group of M channels costing M channels (counts go in and come out in channels)."""
    multiple = masks.channel_multiple
    if multiple == 1:
        return fit_counts(counter, budget, kept_layers, counts, masks.wants(), adjustable, **options)
    grouped = counter.grouped_channels(multiple)
    in_groups = {**counts, "channels": [c // multiple for c in counts["channels"]]}
    fitted = fit_counts(grouped, budget, kept_layers, in_groups, masks.wants(), adjustable, **options)
    return None if fitted is None else {**fitted, "channels": [g * multiple for g in fitted["channels"]]}


def snap_uniform_heads(
    model: nn.Module,
    masks: MaskSet,
    counter: ParamCounter,
    budget: Budget,
    blocks: torch.Tensor,
    arch: Architecture,
    objective: SearchObjective | None = None,
) -> Architecture:
    """Uniform layout: move the shared head count to the nearest value the stock config accepts.

    Both neighbours are landed on the budget (channels absorb the difference) and the one with
    the lower loss on ``blocks`` (the search's ``objective``) wins.
    """
    allowed = masks.allowed_units
    current = arch.unit_counts()[0]
    if not allowed or current in allowed:
        return arch
    best, best_loss = arch, float("inf")
    for value in (
        max([a for a in allowed if a < current], default=None),
        min([a for a in allowed if a > current], default=None),
    ):
        if value is None:
            continue
        counts = masks.counts(arch)
        counts["heads"] = [value] * len(counts["heads"])
        adjustable = [k for k in ("channels",) if k in masks.targets]
        fitted = fit_grouped(masks, counter, budget, arch.kept_layers, counts, adjustable, uniform=True)
        if fitted is None:
            continue
        candidate = masks.architecture_for(arch.kept_layers, fitted)
        loss = hard_loss(model, masks, blocks, candidate, objective)
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best


def guard_layers(
    model: nn.Module,
    masks: MaskSet,
    counter: ParamCounter,
    budget: Budget,
    blocks: torch.Tensor,
    objective: SearchObjective | None = None,
) -> tuple[Architecture, list[dict]]:
    """Restore every dropped layer whose parameters are better spent on its own heads/channels
    (judged by the loss on ``blocks``: the search's ``objective``, or the NLL)."""
    arch = masks.architecture()
    decisions: list[dict] = []
    dropped = [i for i in range(arch.num_layers) if i not in arch.kept_layers]
    if not dropped:
        return arch, decisions
    current = land(masks, counter, budget, arch) or arch
    current_loss = hard_loss(model, masks, blocks, current, objective)
    scores = masks.importance["layers"][0].tolist()
    for layer in sorted(dropped, key=lambda i: -scores[i]):
        candidate = land(
            masks,
            counter,
            budget,
            Architecture(**{**current.to_dict(), "kept_layers": sorted([*current.kept_layers, layer])}),
        )
        candidate_loss = float("inf") if candidate is None else hard_loss(model, masks, blocks, candidate, objective)
        restored = candidate_loss < current_loss
        decisions.append(
            {
                "layer": layer,
                "drop_loss": round(current_loss, 5),
                "keep_loss": round(candidate_loss, 5),
                "dropped": not restored,
            }
        )
        if restored:
            current, current_loss = candidate, candidate_loss
    return current, decisions
