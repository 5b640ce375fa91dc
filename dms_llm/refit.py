"""Deterministic landing on the parameter budget.

After the search, the hard masks may sit a little over or under the target. ``fit_counts``
adjusts the kept counts per layer until the model is at or under the target and, where the
granularity allows, no more than ``BUDGET_TOLERANCE`` of the original size below it:

- over the target: remove one element from the layer whose count sits furthest above what its
  learned keep ratio asks for (the smallest margin ``T * (e * N - k + 0.5)``, i.e. the
  least-secure kept element), channels first (finest grain), then attention units;
- under the floor: add back the most-wanted missing element that still fits.

Within a layer, elements are always kept in importance order, so a count is an architecture.
Layers are never changed here; the layer guard in ``search`` decides those.

Example:
    >>> counts = fit_counts(counter, budget, kept_layers, {"heads": [4, 4], "channels": [90, 80]},
    ...                     margins, adjustable=["channels"])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .budget import Budget, ParamCounter

# margin(kind, layer, count) -> how strongly the learned keep ratio wants the count-th element
Margin = Callable[[str, int, int], float]


def count_params(counter: ParamCounter, kept_layers: Sequence[int], counts: dict[str, list[int]]) -> int:
    layers = counter.layers
    units = counts.get("heads") or [c.units for c in layers]
    channels = counts.get("channels") or [c.channels for c in layers]
    return counter.outside_layers + sum(layers[i].params(units[i], channels[i]) for i in kept_layers)


def _cost(counter: ParamCounter, kind: str, layer: int) -> int:
    cost = counter.layers[layer]
    return cost.unit_cost if kind == "heads" else cost.channel_cost


def _size(counter: ParamCounter, kind: str, layer: int) -> int:
    cost = counter.layers[layer]
    return cost.units if kind == "heads" else cost.channels


def fit_counts(
    counter: ParamCounter,
    budget: Budget,
    kept_layers: Sequence[int],
    counts: dict[str, list[int]],
    margin: Margin,
    adjustable: Sequence[str],
    uniform: bool = False,
    allowed_units: Sequence[int] | None = None,
) -> dict[str, list[int]] | None:
    """Counts at or under ``budget.target`` (and above its floor where possible), or None.

    ``allowed_units`` (uniform layout) restricts the shared attention-unit count to the values
    the family's stock config accepts.
    """
    counts = {kind: list(values) for kind, values in counts.items()}
    kinds = [k for k in ("channels", "heads") if k in adjustable]
    params = count_params(counter, kept_layers, counts)

    def candidates(kind: str, removing: bool) -> list[tuple[float, int]]:
        result = []
        for layer in kept_layers:
            k = counts[kind][layer]
            if removing and k > 1:
                result.append((margin(kind, layer, k), layer))
            if not removing and k < _size(counter, kind, layer):
                result.append((-margin(kind, layer, k + 1), layer))
        return sorted(result)

    if uniform:
        return _fit_uniform(counter, budget, kept_layers, counts, kinds, params, allowed_units)
    for kind in kinds:
        while params > budget.target:
            options = candidates(kind, removing=True)
            if not options:
                break
            layer = options[0][1]
            counts[kind][layer] -= 1
            params -= _cost(counter, kind, layer)
    if params > budget.target:
        return None
    for kind in kinds:
        while params < budget.floor:
            fitting = [
                (score, layer)
                for score, layer in candidates(kind, removing=False)
                if params + _cost(counter, kind, layer) <= budget.target
            ]
            if not fitting:
                break
            layer = fitting[0][1]
            counts[kind][layer] += 1
            params += _cost(counter, kind, layer)
    return counts


def _fit_uniform(
    counter: ParamCounter,
    budget: Budget,
    kept_layers: Sequence[int],
    counts: dict[str, list[int]],
    kinds: Sequence[str],
    params: int,
    allowed_units: Sequence[int] | None = None,
) -> dict[str, list[int]] | None:
    """The same landing with one shared count per kind (every kept layer moves together)."""

    def step_cost(kind: str) -> int:
        return sum(_cost(counter, kind, layer) for layer in kept_layers)

    def shared(kind: str) -> int:
        return counts[kind][kept_layers[0]]

    def neighbour(kind: str, down: bool) -> int | None:
        current = shared(kind)
        size = min(_size(counter, kind, layer) for layer in kept_layers)
        options = allowed_units if (kind == "heads" and allowed_units) else range(1, size + 1)
        options = [k for k in options if (k < current if down else current < k <= size)]
        if not options:
            return None
        return max(options) if down else min(options)

    def move(kind: str, value: int) -> int:
        delta = (value - shared(kind)) * step_cost(kind)
        counts[kind] = [value] * len(counts[kind])
        return delta

    for kind in kinds:
        while params > budget.target and (lower := neighbour(kind, down=True)) is not None:
            params += move(kind, lower)
    if params > budget.target:
        return None
    for kind in kinds:
        while params < budget.floor and (higher := neighbour(kind, down=False)) is not None:
            if params + (higher - shared(kind)) * step_cost(kind) > budget.target:
                break
            params += move(kind, higher)
    return counts
