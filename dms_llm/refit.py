"""Deterministic landing on the parameter budget.

After the search, the hard masks may sit a little over or under the target. ``fit_counts``
adjusts the kept counts per layer until the model is at or under the target and, where the
granularity allows, no more than ``BUDGET_TOLERANCE`` of the original size below it:

- over the target: remove one element from the layer whose count sits furthest above what its
  learned keep ratio asks for (the smallest margin ``T * (e * N - k + 0.5)``, i.e. the
  least-secure kept element), channels first (finest grain), then attention units;
- under the floor: add back the most-wanted missing element that still fits;
- still under the floor (e.g. channels full and one attention unit too big for the room left):
  add the most-wanted unit anyway and trim channels back under the target.

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
    joint: bool = False,
) -> dict[str, list[int]] | None:
    """Counts at or under ``budget.target`` (and above its floor where possible), or None.

    ``uniform`` moves one shared count per kind; ``allowed_units`` then restricts the shared
    attention-unit count to the values the family's stock config accepts. ``joint`` trims
    heads and channels in one ranking (their margins must then be comparable, e.g. standardised
    scores as FLAP uses) instead of channels first.
    """
    landing = _Landing(counter, kept_layers, counts, margin, uniform, allowed_units)
    kinds = [k for k in ("channels", "heads") if k in adjustable]
    if joint and not landing.trim_jointly(kinds, budget.target):
        return None
    if not landing.trim(kinds, budget.target):
        return None
    for kind in kinds:
        while landing.params < budget.floor and landing.grow(kind, budget.target):
            pass
    if landing.params < budget.floor and "channels" in kinds and "heads" in kinds:
        landing.swap_in_unit(budget)
    return landing.counts


class _Landing:
    """Kept counts under adjustment; a move is +-1 in one layer, or one shared step if uniform."""

    def __init__(self, counter, kept_layers, counts, margin, uniform, allowed_units):
        self.counter, self.kept, self.margin = counter, list(kept_layers), margin
        self.uniform, self.allowed = uniform, list(allowed_units or [])
        self.counts = {kind: list(values) for kind, values in counts.items()}
        self.params = count_params(counter, kept_layers, self.counts)

    def _moves(self, kind: str, down: bool) -> list[tuple[float, list[int], int]]:
        """Possible moves of a kind, best first: (priority, layers, new count)."""
        if self.uniform:
            current = self.counts[kind][self.kept[0]]
            size = min(_size(self.counter, kind, layer) for layer in self.kept)
            options = self.allowed if (kind == "heads" and self.allowed) else range(1, size + 1)
            options = [k for k in options if (k < current if down else current < k <= size)]
            if not options:
                return []
            return [(0.0, self.kept, max(options) if down else min(options))]
        moves = []
        for layer in self.kept:
            k = self.counts[kind][layer]
            if down and k > 1:
                moves.append((self.margin(kind, layer, k), [layer], k - 1))
            if not down and k < _size(self.counter, kind, layer):
                moves.append((-self.margin(kind, layer, k + 1), [layer], k + 1))
        return sorted(moves, key=lambda move: move[0])

    def _cost(self, kind: str, layers: list[int], value: int) -> int:
        return sum((value - self.counts[kind][layer]) * _cost(self.counter, kind, layer) for layer in layers)

    def _apply(self, kind: str, layers: list[int], value: int) -> None:
        self.params += self._cost(kind, layers, value)
        for layer in layers:
            self.counts[kind][layer] = value

    def trim(self, kinds: Sequence[str], target: int) -> bool:
        """Remove least-wanted elements, finest kind first, until at or under ``target``."""
        for kind in kinds:
            while self.params > target and (moves := self._moves(kind, down=True)):
                self._apply(kind, *moves[0][1:])
        return self.params <= target

    def trim_jointly(self, kinds: Sequence[str], target: int) -> bool:
        """Remove the least-wanted element of any kind until at or under ``target``."""
        while self.params > target:
            moves = [(move, kind) for kind in kinds for move in self._moves(kind, down=True)[:1]]
            if not moves:
                return False
            (_, layers, value), kind = min(moves, key=lambda item: item[0][0])
            self._apply(kind, layers, value)
        return True

    def grow(self, kind: str, target: int) -> bool:
        """Add the most-wanted element of a kind that still fits under ``target``."""
        for _, layers, value in self._moves(kind, down=False):
            if self.params + self._cost(kind, layers, value) <= target:
                self._apply(kind, layers, value)
                return True
        return False

    def swap_in_unit(self, budget: Budget) -> None:
        """Add an attention unit that does not fit, then trim channels back under the target."""
        for _, layers, value in self._moves("heads", down=False):
            saved = ({k: list(v) for k, v in self.counts.items()}, self.params)
            self._apply("heads", layers, value)
            if self.trim(["channels"], budget.target) and self.params >= budget.floor:
                return
            self.counts, self.params = saved
