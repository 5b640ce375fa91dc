"""Deterministic landing on the parameter budget, as a pure function of scores, costs and budget.

After the search the hard masks may sit a little over or under the target. ``fit_counts`` moves
the kept counts per layer until the model is at or under the target and, where the granularity
allows, no more than ``BUDGET_TOLERANCE`` of the original size below it:

- over the target: remove the least-wanted kept elements, channels first (finest grain), then
  attention units (or both in one ranking with ``joint``);
- under the floor: add back the most-wanted missing elements that still fit;
- still under the floor (e.g. channels full and one attention unit too big for the room left):
  add the most-wanted unit anyway and trim channels back under the target.

How much an element is wanted comes from a table, ``wants[kind][layer][k - 1]`` for the layer's
k-th most important element (non-increasing in k): for DMS the soft mask's logit
``T * (e * N - k + 0.5)``, for the one-shot peers their sorted scores. Each phase is one stable
sort of the candidate moves and one prefix sum of their costs: no per-element loop, no device
sync, so landing a 70B model (2.3M channels) takes a fraction of a second. The greedy order and
its tie-breaks (lower layer first) are those of moving one element at a time.

Within a layer elements are always kept in importance order, so a count is an architecture.
Layers are never changed here; the layer guard in ``search`` decides those.

Example:
    >>> counts = fit_counts(counter, budget, kept_layers, {"heads": [4, 4], "channels": [90, 80]},
    ...                     masks.wants(), adjustable=["channels"])   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .budget import Budget, ParamCounter

# wants[kind][layer][k - 1]: how strongly a layer's k-th most important element is wanted
Wants = dict[str, Sequence[Tensor]]
KINDS = ("channels", "heads")


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


@dataclass
class _Moves:
    """Candidate moves in the order the greedy takes them; each changes one count by one step."""

    kind: Tensor  # index into KINDS
    layer: Tensor  # original layer index (per-layer moves) or -1 (one shared uniform step)
    value: Tensor  # the count after the move
    cost: Tensor  # change of the parameter count (int64, positive magnitude)

    def __len__(self) -> int:
        return self.cost.numel()


def fit_counts(
    counter: ParamCounter,
    budget: Budget,
    kept_layers: Sequence[int],
    counts: dict[str, list[int]],
    wants: Wants,
    adjustable: Sequence[str],
    uniform: bool = False,
    allowed_units: Sequence[int] | None = None,
    joint: bool = False,
) -> dict[str, list[int]] | None:
    """Counts at or under ``budget.target`` (and above its floor where possible), or None.

    ``uniform`` moves one shared count per kind; ``allowed_units`` then restricts the shared
    attention-unit count to the values the family's stock config accepts (a given count that is not
    one starts at the nearest one below it). ``joint`` trims
    heads and channels in one ranking (their wants must then be comparable, e.g. standardised
    scores as FLAP uses) instead of channels first.
    """
    landing = _Landing(counter, kept_layers, counts, wants, uniform, allowed_units)
    kinds = [k for k in KINDS if k in adjustable]
    if joint and not uniform:
        landing.trim(kinds, budget.target)
    for kind in kinds:
        landing.trim([kind], budget.target)
    if landing.params > budget.target:
        return None
    for kind in kinds:
        landing.grow(kind, budget.target, budget.floor)
    if landing.params < budget.floor and kinds == list(KINDS):
        landing.swap_in_unit(budget)
    return landing.counts


class _Landing:
    """Kept counts under adjustment, moved by whole prefixes of sorted candidate moves."""

    def __init__(self, counter, kept_layers, counts, wants, uniform, allowed_units):
        self.counter, self.kept, self.wants = counter, sorted(kept_layers), wants
        self.uniform, self.allowed = uniform, list(allowed_units or [])
        self.counts = {kind: list(values) for kind, values in counts.items()}
        if uniform and self.allowed and "heads" in self.counts:
            # start from a savable shared head count: the nearest at or below the one given
            shared = self.counts["heads"][0]
            snapped = max((k for k in self.allowed if k <= shared), default=min(self.allowed))
            self.counts["heads"] = [snapped] * len(self.counts["heads"])
        self.params = count_params(counter, self.kept, self.counts)

    # ---- candidate moves ---------------------------------------------------------------
    def _per_layer(self, kind: str, down: bool) -> tuple[Tensor, _Moves]:
        """(priority, moves) of every single-element move of a kind, in per-layer order."""
        priorities, layers, values, costs = [], [], [], []
        for layer in self.kept:
            k, size = self.counts[kind][layer], _size(self.counter, kind, layer)
            table = self.wants[kind][layer].detach().to("cpu", torch.float64)
            # removing the j-th element (j = k..2) / adding it back (j = k+1..size), in that order
            span = table[1:k].flip(0) if down else table[k:size]
            steps = torch.arange(k - 1, 0, -1) if down else torch.arange(k + 1, size + 1)
            priorities.append(span)
            layers.append(torch.full((span.numel(),), layer, dtype=torch.long))
            values.append(steps)
            costs.append(torch.full((span.numel(),), _cost(self.counter, kind, layer), dtype=torch.long))
        kind_index = torch.full((sum(p.numel() for p in priorities),), KINDS.index(kind), dtype=torch.long)
        moves = _Moves(kind_index, _cat(layers), _cat(values), _cat(costs))
        return _cat(priorities, torch.float64), moves

    def _shared(self, kind: str, down: bool) -> _Moves:
        """Uniform layout: the sequence of shared values a kind can step through, nearest first."""
        current = self.counts[kind][self.kept[0]]
        size = min(_size(self.counter, kind, layer) for layer in self.kept)
        options = self.allowed if (kind == "heads" and self.allowed) else range(1, size + 1)
        chosen = sorted((k for k in options if (k < current if down else current < k <= size)), reverse=down)
        values = torch.tensor(chosen, dtype=torch.long)
        previous = torch.cat([torch.tensor([current]), values[:-1]])
        per_step = sum(_cost(self.counter, kind, layer) for layer in self.kept)
        costs = (values - previous).abs() * per_step
        return _Moves(torch.full_like(values, KINDS.index(kind)), torch.full_like(values, -1), values, costs)

    def _moves(self, kinds: Sequence[str], down: bool) -> _Moves:
        """Moves in greedy order: least wanted first to remove, most wanted first to add."""
        if self.uniform:
            return self._shared(kinds[0], down)
        pairs = [self._per_layer(kind, down) for kind in kinds]
        priority = _cat([p for p, _ in pairs], torch.float64)
        moves = _Moves(*(_cat([getattr(m, f) for _, m in pairs]) for f in ("kind", "layer", "value", "cost")))
        # stable: ties go to the earlier kind, then the lower layer, as one move at a time would
        order = torch.argsort(priority if down else -priority, stable=True)
        return _Moves(moves.kind[order], moves.layer[order], moves.value[order], moves.cost[order])

    def _apply(self, moves: _Moves, count: int, down: bool) -> None:
        """Take the first ``count`` moves."""
        if count <= 0:
            return
        sign = -1 if down else 1
        self.params += sign * int(moves.cost[:count].sum())
        for index, kind in enumerate(KINDS):
            if kind not in self.counts:
                continue
            chosen = moves.kind[:count] == index
            if not bool(chosen.any()):
                continue
            if self.uniform:  # every layer, dropped ones too, carries the shared count
                value = int(moves.value[:count][chosen][-1])
                self.counts[kind] = [value] * len(self.counts[kind])
                continue
            delta = torch.bincount(moves.layer[:count][chosen], minlength=len(self.counts[kind])) * sign
            self.counts[kind] = [c + d for c, d in zip(self.counts[kind], delta.tolist())]

    # ---- phases ------------------------------------------------------------------------
    def trim(self, kinds: Sequence[str], target: int) -> bool:
        """Remove the least-wanted elements until at or under ``target``; False if impossible."""
        excess = self.params - target
        if excess <= 0:
            return True
        moves = self._moves(kinds, down=True)
        if len(moves) == 0:
            return False
        reached = torch.cumsum(moves.cost, 0)
        count = int(torch.searchsorted(reached, torch.tensor([excess]))[0]) + 1  # first prefix >= excess
        self._apply(moves, min(count, len(moves)), down=True)
        return self.params <= target

    def grow(self, kind: str, target: int, floor: int) -> None:
        """Add the most-wanted missing elements while under ``floor`` and still fitting ``target``.

        Stops at the first move that no longer fits: per kind every layer's step costs the same
        (all supported families), so no later move could fit either.
        """
        if self.params >= floor:
            return
        moves = self._moves([kind], down=False)
        if len(moves) == 0:
            return
        reached = torch.cumsum(moves.cost, 0)
        fits = int(torch.searchsorted(reached, torch.tensor([target - self.params]), right=True)[0])
        enough = int(torch.searchsorted(reached, torch.tensor([floor - self.params]))[0]) + 1
        self._apply(moves, min(fits, enough), down=False)

    def swap_in_unit(self, budget: Budget) -> None:
        """Add an attention unit that does not fit, then trim channels back under the target."""
        moves = self._moves(["heads"], down=False)
        tried: set[int] = set()
        for index in range(len(moves)):
            layer = int(moves.layer[index])
            if layer in tried:  # only each layer's next unit is a single move
                continue
            tried.add(layer)
            saved = ({k: list(v) for k, v in self.counts.items()}, self.params)
            single = _Moves(*(getattr(moves, f)[index : index + 1] for f in ("kind", "layer", "value", "cost")))
            self._apply(single, 1, down=False)
            if self.trim(["channels"], budget.target) and self.params >= budget.floor:
                return
            self.counts, self.params = saved
            if self.uniform:
                return


def _cat(pieces: list[Tensor], dtype: torch.dtype = torch.long) -> Tensor:
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype)
