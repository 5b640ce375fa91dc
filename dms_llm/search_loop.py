"""The DMS search: learn keep ratios on calibration text under a parameter budget.

Schedule over ``steps``:
1. search (up to ``1 - refine_fraction``): weights frozen; every step computes the
   straight-through masks, ``loss = task + w * log(P / P_t) * [P > P_t]`` with the target
   ``P_t`` decaying exponentially from the full size to the budget over ``decay_fraction`` of the
   steps, updates the Taylor importances and takes an Adam step on the keep ratios. Layer
   importance is the measured loss increase when a layer is skipped (first-order scores of whole
   layers are too flat to rank them), re-measured every ``layer_score_every`` steps.
2. layer guard: every layer the masks drop is tested against spending the same parameters on
   heads/channels instead; a layer is only dropped when that costs less loss.
3. refine: heads and layers frozen as hard masks, channel ratios keep learning.
4. landing: a deterministic fit puts the model at or under the target (``refit``).

Example:
    >>> result = search(model, masks, counter, budget, calib_blocks, SearchConfig(steps=300))  # doctest: +SKIP
    >>> result.architecture.kept_layers                                                     # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .architecture import Architecture
from .budget import Budget, ParamCounter, budget_penalty
from .config import SearchConfig
from .errors import DMSError
from .evaluate import mean_loss
from .masks import MaskSet
from .refit import count_params, fit_counts


@dataclass
class SearchResult:
    architecture: Architecture
    params: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    layer_decisions: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {
            "seconds": round(self.seconds, 2),
            "steps": len(self.history),
            "final_task_loss": last.get("task_loss"),
            "layer_decisions": self.layer_decisions,
            "history": self.history[:: max(1, len(self.history) // 50)],
        }


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _batch_order(num_blocks: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Block indices for every step: seeded permutations, concatenated epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = math.ceil(needed / num_blocks)
    return torch.cat([torch.randperm(num_blocks, generator=generator) for _ in range(epochs)])[:needed]


@torch.no_grad()
def _hard_loss(model: nn.Module, masks: MaskSet, blocks: torch.Tensor, arch: Architecture | None = None) -> float:
    """Loss of the hard-masked model (of ``arch`` when given) on fixed blocks."""
    saved_frozen, saved_mode = dict(masks.frozen), masks.mode
    try:
        if arch is not None:
            masks.set_architecture(arch)
        masks.mode = "hard"
        masks.refresh()
        return mean_loss(model, blocks)
    finally:
        masks.frozen, masks.mode = saved_frozen, saved_mode
        masks.deactivate()


@torch.no_grad()
def measure_layer_scores(model: nn.Module, masks: MaskSet, blocks: torch.Tensor) -> torch.Tensor:
    """Loss change when each layer is toggled: removal cost if kept, gain of restoring if dropped."""
    saved_mode = masks.mode
    masks.mode = "hard"
    try:
        masks.refresh()
        base = mean_loss(model, blocks)
        layer_mask = masks.active["layers"][0]
        scores = torch.zeros_like(layer_mask)
        for index in range(layer_mask.numel()):
            toggled = layer_mask.clone()
            toggled[index] = 1.0 - toggled[index]
            masks.active["layers"] = [toggled]
            loss = mean_loss(model, blocks)
            scores[index] = (loss - base) if layer_mask[index] > 0.5 else (base - loss)
            masks.active["layers"] = [layer_mask]
        return scores
    finally:
        masks.mode = saved_mode
        masks.deactivate()


def land(masks: MaskSet, counter: ParamCounter, budget: Budget, arch: Architecture) -> Architecture | None:
    """``arch`` with heads/channels adjusted (layers kept) to land on the budget, or None.

    Frozen heads may move here too: freezing keeps the structure stable while channels refine,
    it does not forbid the final landing from adding or removing a unit.
    """
    adjustable = [k for k in ("channels", "heads") if k in masks.targets]
    counts = fit_counts(
        counter,
        budget,
        arch.kept_layers,
        masks.counts(arch),
        masks.margin,
        adjustable,
        uniform=masks.uniform,
        allowed_units=masks.allowed_units,
    )
    return None if counts is None else masks.architecture_for(arch.kept_layers, counts)


def snap_uniform_heads(
    model: nn.Module,
    masks: MaskSet,
    counter: ParamCounter,
    budget: Budget,
    blocks: torch.Tensor,
    arch: Architecture,
) -> Architecture:
    """Uniform layout: move the shared head count to the nearest value the stock config accepts.

    Both neighbours are landed on the budget (channels absorb the difference) and the one with
    the lower calibration loss wins.
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
        fitted = fit_counts(
            counter,
            budget,
            arch.kept_layers,
            counts,
            masks.margin,
            [k for k in ("channels",) if k in masks.targets],
            uniform=True,
        )
        if fitted is None:
            continue
        candidate = masks.architecture_for(arch.kept_layers, fitted)
        loss = _hard_loss(model, masks, blocks, candidate)
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best


def guard_layers(
    model: nn.Module, masks: MaskSet, counter: ParamCounter, budget: Budget, blocks: torch.Tensor
) -> tuple[Architecture, list[dict]]:
    """Restore every dropped layer whose parameters are better spent on its own heads/channels."""
    arch = masks.architecture()
    decisions: list[dict] = []
    dropped = [i for i in range(arch.num_layers) if i not in arch.kept_layers]
    if not dropped:
        return arch, decisions
    current = land(masks, counter, budget, arch) or arch
    current_loss = _hard_loss(model, masks, blocks, current)
    scores = masks.importance["layers"][0]
    for layer in sorted(dropped, key=lambda i: -float(scores[i])):
        candidate = land(
            masks,
            counter,
            budget,
            Architecture(**{**current.to_dict(), "kept_layers": sorted([*current.kept_layers, layer])}),
        )
        candidate_loss = _hard_loss(model, masks, blocks, candidate) if candidate is not None else float("inf")
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


def search(
    model: nn.Module,
    masks: MaskSet,
    counter: ParamCounter,
    budget: Budget,
    blocks: torch.Tensor,
    config: SearchConfig,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run the DMS search on ``blocks`` (N, seq_len); returns the landed architecture."""
    accelerator = accelerator or Accelerator()
    torch.manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers only checkpoints in training mode; Llama has no dropout
    else:
        model.eval()
    device = model.get_input_embeddings().weight.device
    optimizer = torch.optim.Adam(masks.parameters(), lr=config.lr)
    steps = config.steps
    decay_steps = int(round(config.decay_fraction * steps))
    refine_start = int(round((1.0 - config.refine_fraction) * steps))
    world, rank = accelerator.num_processes, accelerator.process_index
    order = _batch_order(blocks.shape[0], steps, config.batch_size * world, seed)
    score_blocks = blocks[: config.score_blocks]
    masks.mode = config.mask_forward
    use_layer_scores = "layers" in masks.targets and config.layer_importance == "skip_loss"
    reduce = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else None
    result = SearchResult(masks.architecture(), counter.total, 0.0)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="DMS search", disable=not (progress and accelerator.is_main_process))
    for step in bar:
        if step == refine_start and step > 0:
            arch, result.layer_decisions = (
                guard_layers(model, masks, counter, budget, score_blocks)
                if "layers" in masks.targets
                else (masks.architecture(), [])
            )
            arch = snap_uniform_heads(model, masks, counter, budget, score_blocks, arch)
            masks.set_keep_counts(masks.counts(arch))
            masks.freeze("layers", arch)
            masks.freeze("heads", arch)
        if use_layer_scores and "layers" not in masks.frozen and step % config.layer_score_every == 0:
            masks.set_layer_importance(measure_layer_scores(model, masks, score_blocks))
        global_batch = order[step * config.batch_size * world : (step + 1) * config.batch_size * world]
        batch = blocks[global_batch[rank * config.batch_size : (rank + 1) * config.batch_size]].to(device)
        masks.refresh()
        with accelerator.autocast():
            task_loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        params = masks.param_count(counter)
        target = budget.target_at(step, decay_steps)
        loss = task_loss.float() + budget_penalty(params, target, config.budget_weight).float()
        accelerator.backward(loss)
        masks.update_importance(config.importance_beta, reduce)
        if world > 1:
            for parameter in masks.parameters():
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, "mean")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masks.clamp_()
        masks.deactivate()
        record = {
            "step": step,
            "loss": round(loss.detach().item(), 5),
            "task_loss": round(task_loss.detach().item(), 5),
            "params": int(round(params.detach().item())),
            "target": int(target),
        }
        result.history.append(record)
        bar.set_postfix_str(_postfix(masks, record))
    arch = snap_uniform_heads(model, masks, counter, budget, score_blocks, masks.architecture())
    landed = land(masks, counter, budget, arch)
    while landed is None:  # too many layers kept to fit: drop the least important and retry
        scores = masks.importance["layers"][0] if "layers" in masks.targets else None
        if scores is None or len(arch.kept_layers) <= 1:
            raise DMSError("the budget cannot be reached with the layers this search kept; use a smaller --ratio")
        weakest = min(arch.kept_layers, key=lambda i: float(scores[i]))
        arch = arch.drop_layer(weakest)
        landed = land(masks, counter, budget, arch)
    masks.set_architecture(landed)
    result.architecture = landed
    result.params = count_params(counter, landed.kept_layers, masks.counts(landed))
    result.seconds = time.perf_counter() - start
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return result


def _postfix(masks: MaskSet, record: dict) -> str:
    arch = masks.architecture()
    parts = [f"loss {record['task_loss']:.3f}", f"params {_human(record['params'])}/{_human(record['target'])}"]
    if "heads" in masks.targets:
        parts.append(f"units {sum(len(arch.kept_units[i]) for i in arch.kept_layers)}/{sum(arch.original_units)}")
    if "channels" in masks.targets:
        kept = sum(len(arch.kept_channels[i]) for i in arch.kept_layers)
        parts.append(f"channels {kept}/{sum(arch.original_channels)}")
    if "layers" in masks.targets:
        parts.append(f"layers {len(arch.kept_layers)}/{arch.num_layers}")
    return " ".join(parts)
