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

Each step averages ``grad_accum`` micro-batches on every data-parallel rank: keep-ratio gradients
are averaged and squared mask gradients summed over micro-batches and ranks, so every rank holds
identical masks, and one process with ``grad_accum = N`` reproduces N processes exactly. In
``joint`` mode the weights train too (optionally distilled from the dense teacher); in ``lora``
mode LoRA adapters train with the ratios on the frozen weights and are merged into them at the end
(``search_adapters``), so the landed model is a plain one of the same shapes; the adapters are
averaged over ranks like the ratios (one process then matches N ranks up to rounding, which the
trained adapters carry from step to step). With a
``state_dir`` the state is saved every ``save_every`` steps and ``resume`` continues from it.

Example:
    >>> result = search(model, masks, counter, budget, calib_blocks, SearchConfig(steps=300))  # doctest: +SKIP
    >>> result.architecture.kept_layers                                                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .activation_checkpointing import set_activation_checkpointing
from .architecture import Architecture
from .budget import Budget, ParamCounter, budget_penalty
from .config import SearchConfig
from .errors import DMSError
from .launch import check_distributed
from .layer_scores import ScoreBudget, measure_layer_scores
from .losses import CausalLMLoss, SearchObjective, TeacherTargets
from .masks import MaskSet
from .refit import count_params
from .search_adapters import adapter_state, attach_search_adapters, merge_search_adapters
from .search_state import load_state, restore_state, save_state, saved_weights
from .sharding import is_sharded, local_weight_bytes, replicated_parameters
from .structure import guard_layers, land, snap_uniform_heads


@dataclass
class SearchResult:
    architecture: Architecture
    params: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    layer_decisions: list[dict] = field(default_factory=list)
    processes: int = 1  # data-parallel ranks that ran the search
    rank_weight_bytes: int | None = None  # sharded: the weight bytes one rank held (its shards + replicated)
    method: str = "dms"  # or the peer criterion (--method) that chose the architecture

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {
            "method": self.method,
            "seconds": round(self.seconds, 2),
            "steps": len(self.history),
            "processes": self.processes,
            "sharded": self.rank_weight_bytes is not None,
            "rank_weight_bytes": self.rank_weight_bytes,
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
    teacher: TeacherTargets | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    keep_adapters: bool = False,
) -> SearchResult:
    """Run the DMS search on ``blocks`` (N, seq_len); returns the landed architecture.

    ``teacher``: the dense model's targets on ``blocks`` (the kd losses distil from them).
    ``keep_adapters``: lora mode leaves its adapters unmerged (and the masks hooked on them).
    """
    accelerator = accelerator or Accelerator()
    sharded = is_sharded(model)
    check_distributed(accelerator, sharded)
    # "auto" made concrete; called without the dense model's targets, an auto loss is the task loss
    config = config.resolved(teacher=teacher is not None)
    torch.manual_seed(seed)
    joint, lora = config.mode == "joint", config.mode == "lora"
    if joint and sharded and resume:
        raise DMSError(
            "a sharded joint search keeps no resumable state (its trained weights are split over the ranks); "
            "rerun without --resume"
        )
    model.requires_grad_(joint)
    weight_bytes = local_weight_bytes(model) if sharded else None  # before lora mode's adapters join them
    adapters: list[nn.Parameter] = []
    if lora:  # wrappers replace the projections: the masks must hook the wrappers instead
        adapters = attach_search_adapters(model, masks.adapter, config)
        masks.reattach()
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    # transformers only checkpoints in training mode; Llama-family models have no dropout
    model.train(config.gradient_checkpointing or joint)
    optimizers = {"ratios": torch.optim.Adam(masks.parameters(), lr=config.lr)}
    forward = CausalLMLoss(model)  # chunked loss: no full-vocabulary logits
    if joint:
        optimizers["weights"] = torch.optim.AdamW(model.parameters(), lr=config.weight_lr, weight_decay=0.0)
        if accelerator.num_processes > 1 and not sharded:
            forward = accelerator.prepare_model(forward)  # DDP: weight grads sync
    if lora:
        optimizers["weights"] = torch.optim.AdamW(adapters, lr=config.lora_lr, weight_decay=0.0)
    kd_weight = config.distill_weight if ("kd" in config.loss and teacher is not None) else 0.0
    if "kd" in config.loss and teacher is None:
        raise DMSError(f"search.loss={config.loss} needs the dense model's targets (teacher_targets)")
    task_weight = 1.0 if "task" in config.loss else 0.0
    device = model.get_input_embeddings().weight.device
    steps, accum = config.steps, config.grad_accum
    decay_steps = int(round(config.decay_fraction * steps))
    refine_start = int(round((1.0 - config.refine_fraction) * steps))
    world, rank = accelerator.num_processes, accelerator.process_index
    chunk = config.batch_size
    order = _batch_order(blocks.shape[0], steps, chunk * world * accum, seed)
    score_blocks = blocks[: config.score_blocks]
    # the discrete decisions (layer scores, guard, head snapping) measure the loss the search minimises
    objective = SearchObjective(teacher if kd_weight else None, kd_weight, task_weight)
    masks.mode = config.mask_forward
    # lora_A (lora mode) or a trained weight (joint mode) would keep a second copy of each masked
    # projection input; structure mode's frozen projections keep none, and activation checkpointing
    # keeps no activation (its own saved-tensor hooks must not be overridden inside a projection)
    factored = (joint or lora) and not config.gradient_checkpointing
    saving_products = masks.products if factored else contextlib.nullcontext()
    # joint mode trains the dropped layers' weights on zero gradients (AdamW moments), and DDP expects a
    # gradient for every weight: their blocks keep their backward there
    if joint:
        masks.skip_dropped_backward = False
    use_layer_scores = "layers" in masks.targets and config.layer_importance == "skip_loss"
    reduce = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else None
    head_params = model.get_output_embeddings().weight.numel()
    score_budget = ScoreBudget.for_search(counter, head_params, config, blocks.shape[1])
    result = SearchResult(masks.architecture(), counter.total, 0.0, processes=world)
    result.rank_weight_bytes = weight_bytes
    fingerprint = search_fingerprint(model, masks, counter, budget, blocks, config, seed)
    start_step = 0
    if resume and state_dir is not None and (state := load_state(state_dir)) is not None:
        tensors, meta = state
        start_step = restore_state(tensors, meta, masks, optimizers, fingerprint)
        if joint or lora:
            model.load_state_dict(saved_weights(tensors), strict=False)
        result.history, result.layer_decisions = meta["history"], meta["layer_decisions"]
    start = time.perf_counter()
    bar = tqdm(
        range(start_step, steps),
        desc="DMS search",
        initial=start_step,
        total=steps,
        disable=not (progress and accelerator.is_main_process),
    )
    for step in bar:
        if step == refine_start and step > 0 and "heads" not in masks.frozen:
            result.layer_decisions = _settle_structure(model, masks, counter, budget, score_blocks, objective)
        if not (joint or lora) and all(kind in masks.frozen for kind in masks.targets):
            # the refine phase trains channel ratios (and weights or adapters where they train): with
            # the heads and layers settled and none of those, nothing is left to learn
            break
        if use_layer_scores and "layers" not in masks.frozen and step % config.layer_score_every == 0:
            scores = measure_layer_scores(
                model, masks, score_blocks, score_budget, rank, world, reduce, chunk, sharded, objective
            )
            masks.set_layer_importance(scores)
        global_batch = order[step * chunk * world * accum : (step + 1) * chunk * world * accum]
        target = budget.target_at(step, decay_steps)
        task_total = 0.0
        for micro in range(accum):
            part = rank * accum + micro
            rows = global_batch[part * chunk : (part + 1) * chunk]
            batch = blocks[rows].to(device)
            masks.refresh()
            with accelerator.autocast(), saving_products:
                task, _ = forward(batch, teacher.select(rows) if kd_weight else None, kd_weight, task_weight)
            loss = task / accum
            if micro == 0:  # the budget term depends on the masks only: once per step
                params = masks.param_count(counter)
                loss = loss + budget_penalty(params, target, config.budget_weight).float()
            accelerator.backward(loss)
            masks.collect_scores(scale=accum)
            task_total += task.detach().item() / accum
        masks.update_importance(config.importance_beta, reduce)
        for parameter in adapters:  # a dropped layer's block ran no backward: its gradient is exactly zero
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        if world > 1:
            # FSDP averages the gradients of its shards itself; the replicated tensors are averaged here
            replicated = list(masks.parameters()) + adapters
            replicated += replicated_parameters(model) if joint and sharded else []
            for parameter in replicated:
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, "mean")
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        masks.clamp_()
        masks.deactivate()
        penalty = budget_penalty(params.detach(), target, config.budget_weight).item()
        record = {
            "step": step,
            "loss": round(task_total + penalty, 5),
            "task_loss": round(task_total, 5),
            "params": int(round(params.detach().item())),
            "target": int(target),
        }
        result.history.append(record)
        bar.set_postfix_str(_postfix(masks, record))
        saves = state_dir is not None and config.save_every and not (joint and sharded)
        if saves and (step + 1) % config.save_every == 0:
            if accelerator.is_main_process:
                weights = model.state_dict() if joint else (adapter_state(model) if lora else None)
                save_state(
                    state_dir,
                    step + 1,
                    masks,
                    optimizers,
                    {"fingerprint": fingerprint, "history": result.history, "layer_decisions": result.layer_decisions},
                    weights,
                )
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step, record)
    arch = snap_uniform_heads(model, masks, counter, budget, score_blocks, masks.architecture(), objective)
    landed = land(masks, counter, budget, arch)
    while landed is None:  # too many layers kept to fit: drop the least important and retry
        scores = masks.importance["layers"][0].tolist() if "layers" in masks.targets else None
        if scores is None or len(arch.kept_layers) <= 1:
            raise DMSError("the budget cannot be reached with the layers this search kept; use a smaller --ratio")
        weakest = min(arch.kept_layers, key=lambda i: scores[i])
        arch = arch.drop_layer(weakest)
        landed = land(masks, counter, budget, arch)
    masks.set_architecture(landed)
    result.architecture = landed
    result.params = count_params(counter, landed.kept_layers, masks.counts(landed))
    result.seconds = time.perf_counter() - start
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.requires_grad_(False)
    model.eval()
    if lora and not keep_adapters:
        merge_search_adapters(model)
        masks.reattach()
    return result


def search_fingerprint(model, masks: MaskSet, counter, budget: Budget, blocks, config: SearchConfig, seed: int) -> dict:
    """Everything that shapes a search, so that a saved state only resumes the same run.

    The model by its shapes and a checksum of its embedding's first rows, the calibration blocks
    by a checksum of their tokens, the budget, targets, layout, seed and search settings (how often
    the state is saved may change). Not the number of processes: a run may resume on another.
    """
    import hashlib

    embedding = model.get_input_embeddings().weight.detach()[:8].float().cpu().contiguous()
    geometry = masks.geometry
    return {
        "search": {k: v for k, v in asdict(config).items() if k != "save_every"},
        "seed": seed,
        "target": budget.target,
        "model": {
            "params": counter.total,
            "units": list(geometry.units),
            "channels": list(geometry.channels),
            "embedding": hashlib.sha256(embedding.numpy().tobytes()).hexdigest()[:16],
        },
        "calibration": {
            "blocks": list(blocks.shape),
            "tokens": hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16],
        },
        "targets": list(masks.targets),
        "uniform": masks.uniform,
    }


def _settle_structure(model, masks: MaskSet, counter, budget, score_blocks, objective: SearchObjective) -> list[dict]:
    """Refine starts: guard the dropped layers, snap uniform heads, then freeze heads and layers."""
    arch, decisions = (
        guard_layers(model, masks, counter, budget, score_blocks, objective)
        if "layers" in masks.targets
        else (masks.architecture(), [])
    )
    arch = snap_uniform_heads(model, masks, counter, budget, score_blocks, arch, objective)
    masks.set_keep_counts(masks.counts(arch))
    masks.freeze("layers", arch)
    masks.freeze("heads", arch)
    return decisions


def _postfix(masks: MaskSet, record: dict) -> str:
    """Progress text from the counts the step's ``refresh`` already computed (no extra ranking)."""
    kept, geometry = masks.kept_counts(), masks.geometry
    parts = [f"loss {record['task_loss']:.3f}", f"params {_human(record['params'])}/{_human(record['target'])}"]
    if "heads" in kept:
        parts.append(f"units {kept['heads']:.0f}/{sum(geometry.units)}")
    if "channels" in kept:
        parts.append(f"channels {kept['channels']:.0f}/{sum(geometry.channels)}")
    if "layers" in kept:
        parts.append(f"layers {kept['layers']:.0f}/{geometry.num_layers}")
    return " ".join(parts)
