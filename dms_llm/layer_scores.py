"""Layer importance: the loss change when a layer is toggled, at a bounded cost.

The loss is the search's own (``SearchObjective``): with a distilling search, the KL to the dense
model's predictions counts as well as the calibration text's NLL, so a layer that matters for
what the model predicts in general (often the last) is not dropped because the text alone
tolerates it.

Whole layers are ranked by the measured loss change when each is toggled (skipped if kept,
restored if dropped); first-order scores of whole layers are too flat to rank them. Measuring
every layer costs L forward passes and would cost as much as the search itself at 80 layers, so:

1. Candidates are the dropped layers, then the kept layers from least to most important: by
   their last scores, or at the first scoring by block influence, ``1 - cos(h_in, h_out)``
   (ShortGPT), from one extra pass. They are taken while their cost fits ``ScoreBudget``: a fixed
   share of the search's own compute, counted from the parameter counts, so the choice is
   deterministic and independent of the machine and of how the batch is split over ranks.
2. One pass per batch gives the base loss and the influence, and records each candidate's input;
   a candidate is then measured by replaying only the layers from it onwards (the layers before
   it are unchanged): on average half a forward pass, not a whole one.
3. Data-parallel ranks split the candidates and sum the results: every rank gets all scores.

Layers that were not measured rank above every measured one (kept, by influence) or keep their
previous score (dropped).

Example:
    >>> scores = measure_layer_scores(model, masks, blocks)       # every layer, no budget   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import ParamCounter
from .config import SearchConfig
from .losses import SearchObjective, decoder_of
from .masks import MaskSet


@dataclass(frozen=True)
class ScoreBudget:
    """The compute one layer scoring may spend, in units of parameters x tokens."""

    allowance: float  # per rank
    layer_costs: tuple[float, ...]  # per token: the parameters each decoder layer multiplies
    head_cost: float  # per token: the parameters of lm_head

    @classmethod
    def for_search(cls, counter: ParamCounter, head_params: int, config: SearchConfig, seq_len: int) -> ScoreBudget:
        """``config.layer_score_budget`` of a whole search's compute, spread over its scorings.

        A search step costs a forward and an input-gradient backward (no weight gradients) of
        ``batch_size * grad_accum`` blocks on every rank: ``2 * tokens * params``.
        """
        layers = tuple(float(c.params(c.units, c.channels)) for c in counter.layers)
        step = 2.0 * config.batch_size * config.grad_accum * seq_len * (sum(layers) + head_params)
        refine_start = round((1.0 - config.refine_fraction) * config.steps)
        scorings = max(1, len(range(0, refine_start, config.layer_score_every)))
        return cls(config.layer_score_budget * config.steps * step / scorings, layers, float(head_params))

    def candidates(self, order: list[int], tokens: int, world: int, passes: int) -> list[int]:
        """The prefix of ``order`` this budget affords, the toggles split over ``world`` ranks.

        ``passes`` full forward passes come first; they are counted once, so one rank with
        ``grad_accum = N`` chooses exactly what N ranks choose.
        """
        left = world * self.allowance - passes * tokens * (sum(self.layer_costs) + self.head_cost)
        chosen = []
        for layer in order:
            cost = tokens * (sum(self.layer_costs[layer:]) + self.head_cost)
            if cost > left:
                break
            chosen.append(layer)
            left -= cost
        return chosen


class _Recorder:
    """Hooks on the decoder layers: each layer's input and call arguments, and its block influence."""

    def __init__(self, layers: nn.ModuleList, keep: set[int]):
        self.keep, self.inputs, self.calls, self.num_layers = keep, {}, {}, len(layers)
        self.sums: dict[int, Tensor] = {}  # summed 1 - cos per layer, on its device (no sync per layer)
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(index), with_kwargs=True))

    def _pre(self, index: int) -> Callable:
        def hook(module, args, kwargs):
            self.calls[index] = (args[1:], kwargs)
            self.inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post(self, index: int) -> Callable:
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(self.inputs[index].float(), out.float(), dim=-1)
            self.sums[index] = (1.0 - cosine).sum()
            if index not in self.keep:
                del self.inputs[index]

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def influence(self) -> Tensor:
        """Summed block influence of every layer in the recorded pass (one transfer to the host)."""
        total = torch.zeros(self.num_layers, dtype=torch.float64)
        if self.sums:
            indices = sorted(self.sums)
            total[indices] = torch.stack([self.sums[i].cpu() for i in indices]).to(torch.float64)
        return total


def _replay(
    model: nn.Module,
    layers: nn.ModuleList,
    norm: nn.Module,
    recorder: _Recorder,
    start: int,
    batch: Tensor,
    rows: Tensor,
    objective: SearchObjective,
) -> Tensor:
    """Summed loss of ``batch`` when the decoder runs from layer ``start`` on its recorded input."""
    hidden = recorder.inputs[start]
    for index in range(start, len(layers)):
        args, kwargs = recorder.calls[index]
        output = layers[index](hidden, *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
    return objective.summed_of_hidden(model, norm(hidden), batch, rows)


@torch.no_grad()
def measure_layer_scores(
    model: nn.Module,
    masks: MaskSet,
    blocks: Tensor,
    budget: ScoreBudget | None = None,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 8,
    split_data: bool = False,
    objective: SearchObjective | None = None,
) -> Tensor:
    """Layer scores under the current hard masks: loss change when each (candidate) layer is toggled.

    Without ``budget`` every layer is measured. ``reduce`` sums a tensor over the ranks.
    ``objective``: the loss measured (the search's own; the NLL of ``blocks`` when None).
    ``split_data``: the ranks split the blocks instead of the candidates (a sharded model gathers
    each layer on all ranks at once, so every rank must run the same layers).
    """
    device = model.get_input_embeddings().weight.device
    objective = objective or SearchObjective()
    layers = masks.adapter.decoder_layers(model)
    norm = model.get_submodule(masks.adapter.final_norm)
    previous = masks.importance["layers"][0].detach().cpu().to(torch.float64)
    saved_mode = masks.mode
    masks.mode = "hard"
    try:
        masks.refresh()
        layer_mask = masks.active["layers"][0]
        kept = layer_mask.detach().cpu() > 0.5
        split = split_data and world > 1 and reduce is not None
        rows = torch.arange(blocks.shape[0])  # each block's row in the objective's teacher targets
        if split:  # equal shares: every rank runs the layers the same number of times
            rows = rows[: max(1, rows.shape[0] // world) * world]
            if rows.shape[0] < world:
                rows = rows.repeat(world)
        blocks = blocks[rows]
        tokens = blocks.numel()
        total = (lambda t: reduce(t.to(device)).cpu()) if split else (lambda t: t)
        mine = _rank_share(rows, rank, world) if split else rows
        batches = [
            (blocks[mine[i : i + batch_size]].to(device), mine[i : i + batch_size])
            for i in range(0, mine.shape[0], batch_size)
        ]
        # candidates: the dropped layers, then the kept ones, least important first: by the last
        # scores, or (first scoring) by the block influence of an extra pass
        passes, ranking = 1, previous
        if bool(previous.max() == previous.min()):
            passes, ranking = 2, total(_influence_pass(model, layers, [batch for batch, _ in batches])) / tokens
        order = [i for i in range(len(layers)) if not kept[i]]
        order += sorted((i for i in range(len(layers)) if kept[i]), key=lambda i: (float(ranking[i]), i))
        candidates = order if budget is None else budget.candidates(order, tokens, world, passes)
        measured_here = sorted(candidates if split else candidates[rank::world])
        # one pass: base loss and influence; this rank's candidates replayed from their inputs
        base, losses = 0.0, torch.zeros(len(layers), dtype=torch.float64)
        influence = torch.zeros(len(layers), dtype=torch.float64)
        for batch, batch_rows in batches:
            recorder = _Recorder(layers, keep=set(measured_here))
            try:
                hidden = decoder_of(model)(input_ids=batch, use_cache=False).last_hidden_state
            finally:
                recorder.remove()
            base += float(objective.summed_of_hidden(model, hidden, batch, batch_rows))
            influence += recorder.influence
            for layer in measured_here:
                toggled = layer_mask.clone()
                toggled[layer] = 1.0 - toggled[layer]
                masks.active["layers"] = [toggled]
                losses[layer] += float(_replay(model, layers, norm, recorder, layer, batch, batch_rows, objective))
                masks.active["layers"] = [layer_mask]
        if split:
            base = float(total(torch.tensor([base], dtype=torch.float64)))
            influence = total(influence)
        if reduce is not None and world > 1:
            losses = reduce(losses.to(device)).cpu()
        predicted = blocks[:, 1:].numel()  # every position but the first is scored
        scores = _assemble(losses / predicted, base / predicted, kept, influence / tokens, candidates, previous)
        return scores.to(masks.importance["layers"][0])
    finally:
        masks.mode = saved_mode
        masks.deactivate()


def _rank_share(rows: Tensor, rank: int, world: int) -> Tensor:
    """This rank's contiguous share of ``rows`` (their count is a multiple of ``world``)."""
    share = rows.shape[0] // world
    return rows[rank * share : (rank + 1) * share]


def _influence_pass(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor]) -> Tensor:
    """Summed block influence of every layer over the batches (one forward pass, no loss)."""
    total = torch.zeros(len(layers), dtype=torch.float64)
    for batch in batches:
        recorder = _Recorder(layers, keep=set())
        try:
            decoder_of(model)(input_ids=batch, use_cache=False)
        finally:
            recorder.remove()
        total += recorder.influence
    return total


def _assemble(losses, base, kept, influence, candidates, previous) -> Tensor:
    """Scores of every layer from the measured candidates, influence and the previous scores."""
    scores = previous.clone()
    measured = torch.zeros(len(scores), dtype=torch.bool)
    measured[candidates] = True
    change = losses - base
    scores[measured] = torch.where(kept[measured], change[measured], -change[measured])
    top = float(scores[measured].max()) if measured.any() else 0.0
    unmeasured_kept = kept & ~measured
    scores[unmeasured_kept] = top + 1.0 + influence[unmeasured_kept]  # above every measured layer
    return scores
