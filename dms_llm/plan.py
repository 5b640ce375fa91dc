"""What a prune will do and hold, from the config alone: ``dms-llm prune ... --dry-run``.

Before a 70B run takes GPUs for hours, the plan answers from ``config.json`` and the tokenizer (no
weights are read): the exact parameter counts (the counter the search itself uses, on a model built
on the meta device), the target and the largest reachable ratio, the resolved search settings and
calibration data, and the memory that does not depend on activations: the weights in the dtype
they will load in, the largest rank's share under ``--shard``, the pruned model at the target, and
lora mode's adapters with their gradients and AdamW moments (counted by attaching them to the meta
model, as the search does), and the disk the run writes (the checkpoint, and the resumable search
state kept beside it). Activations depend on the batch, the sequence length and the attention
kernel; the scale benchmark measures them.

Example:
    >>> config = PruneConfig(ratio=0.2, dtype="bfloat16")
    >>> plan = prune_plan("meta-llama/Llama-2-70b-hf", config, calibration)  # doctest: +SKIP
    >>> print(render_plan(plan))                                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import get_adapter
from .budget import ParamCounter, resolve_budget
from .checkpoint import empty_model, load_config, resolve_device, resolve_dtype
from .config import PruneConfig
from .data import CalibrationData
from .disk_space import size_text
from .tokenizer_files import tokenizer_files_bytes

SHARD_RANKS = (2, 4, 8)


@dataclass
class PrunePlan:
    model: str
    family: str
    layers: int
    kv_groups: tuple[int, int]  # fewest and most KV groups in a layer (equal unless already pruned)
    group_size: int  # query heads per KV group
    mlp_width: tuple[int, int]
    vocab: int
    params: int
    non_embedding: int
    target: int
    ratio: float
    largest_ratio: float
    dtype: str
    weight_bytes: int
    pruned_bytes: int  # the pruned model at the target, at most
    shard_rank_bytes: dict[int, int]  # ranks -> weight bytes of the largest rank under --shard
    adapter_params: int | None  # lora mode's adapters (None in other modes)
    adapter_bytes: int | None  # the adapters, their gradients and AdamW's two moments
    state_bytes: int  # the resumable search state on disk (0 when none is kept)
    tokenizer_bytes: int  # the tokenizer files every checkpoint carries
    settings: dict

    @property
    def disk_bytes(self) -> int:
        """The most disk the run holds at once: a state save writes the new state beside the old
        one, and the checkpoint is written while the last state is still kept."""
        return max(2 * self.state_bytes, self.state_bytes + self.pruned_bytes + self.tokenizer_bytes)


def largest_shard_bytes(model: torch.nn.Module, layers: torch.nn.ModuleList, ranks: int, element: int) -> int:
    """Weight bytes of rank 0 when every decoder layer's tensors are split by rows over ``ranks``
    (as FSDP's ``fully_shard`` does: ceil(rows / ranks) rows to the first ranks), the rest whole."""
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    total = 0
    for param in model.parameters():  # tied weights are one parameter: counted once
        if id(param) in layer_params and param.dim() > 0:
            rows = param.shape[0]
            total += min(rows, math.ceil(rows / ranks)) * (param.numel() // rows)
        else:
            total += param.numel()
    return total * element


def prune_plan(
    model_name: str, config: PruneConfig, calibration: CalibrationData | None = None, launched: int = 1
) -> PrunePlan:
    """The plan of ``dms-llm prune model_name`` with ``config``: counts, settings and memory.

    ``calibration``: the blocks the run would search on (described in the settings when given);
    ``launched``: the ranks of this launch (their shard size is planned too).
    """
    ranks = sorted(set(SHARD_RANKS) | ({launched} if launched > 1 else set()))
    model_config = load_config(model_name)
    adapter = get_adapter(model_config)
    model = empty_model(model_config)
    counter = ParamCounter.from_model(model, adapter)
    budget = resolve_budget(counter, config.ratio, config.params, config.targets)
    geometry = adapter.geometry(model)
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    element = dtype.itemsize
    layers = adapter.decoder_layers(model)
    search = config.search.resolved()
    settings = {"method": config.method, "layout": config.layout, "targets": ",".join(config.targets)}
    if calibration is not None:
        settings["calibration"] = calibration_setting(calibration, config)
    if config.method == "dms":
        settings.update(mode=search.mode, loss=search.loss, steps=search.steps)
        settings["step"] = f"{search.batch_size} blocks x {search.grad_accum} micro-batches per process"
    shard_rank_bytes = {n: largest_shard_bytes(model, layers, n, element) for n in ranks}  # before adapters
    adapter_params = adapter_bytes = None
    if config.method == "dms" and search.mode == "lora":
        from .search_adapters import attach_search_adapters

        trained = attach_search_adapters(model, adapter, search)  # on the meta model: shapes only
        adapter_params = sum(p.numel() for p in trained)
        # weights, gradients and AdamW's two moments, in the adapters' own (float32) dtype
        adapter_bytes = 4 * sum(p.numel() * p.element_size() for p in trained)
    return PrunePlan(
        model=model_name,
        family=model_config.model_type,
        layers=geometry.num_layers,
        kv_groups=(min(geometry.units), max(geometry.units)),
        group_size=geometry.group_size,
        mlp_width=(min(geometry.channels), max(geometry.channels)),
        vocab=model_config.vocab_size,
        params=counter.total,
        non_embedding=counter.non_embedding,
        target=budget.target,
        ratio=budget.ratio,
        largest_ratio=1.0 - budget.minimum / counter.total,
        dtype=str(dtype).removeprefix("torch."),
        weight_bytes=counter.total * element,
        pruned_bytes=budget.target * element,
        shard_rank_bytes=shard_rank_bytes,
        adapter_params=adapter_params,
        adapter_bytes=adapter_bytes,
        state_bytes=_state_bytes(config, counter.total * element, adapter_bytes),
        tokenizer_bytes=tokenizer_files_bytes(model_name),
        settings=settings,
    )


def calibration_setting(calibration: CalibrationData, config: PruneConfig) -> str:
    """How the plan describes the calibration blocks."""
    blocks = calibration.calib
    return f"{blocks.shape[0]} blocks x {blocks.shape[1]} tokens ({blocks.numel():,} tokens) from {config.data.calib}"


def _state_bytes(config: PruneConfig, weight_bytes: int, adapter_bytes: int | None) -> int:
    """Disk of the search state saved every ``search.save_every`` steps: joint mode keeps the weights
    and AdamW's two moments (in the weights' dtype); lora mode its adapters and their moments
    (``adapter_bytes`` also counts their gradients, which are not saved); structure mode only
    its masks (kilobytes)."""
    search = config.search.resolved()
    if config.method != "dms" or not search.save_every or (search.mode == "joint" and config.shard):
        return 0  # no state, or (a sharded joint search) none kept
    if search.mode == "joint":
        return 3 * weight_bytes
    if search.mode == "lora":
        return 3 * (adapter_bytes or 0) // 4
    return 0


def _span(values: tuple[int, int]) -> str:
    return str(values[0]) if values[0] == values[1] else f"{values[0]}-{values[1]}"


def render_plan(plan: PrunePlan) -> str:
    """The plan as the lines ``--dry-run`` prints."""
    shards = ", ".join(f"{n} ranks {size_text(b)}" for n, b in plan.shard_rank_bytes.items())
    lines = [
        f"model: {plan.model} ({plan.family}): {plan.layers} layers, {_span(plan.kv_groups)} KV groups of "
        f"{plan.group_size} query heads, MLP width {_span(plan.mlp_width)}, vocabulary {plan.vocab:,}",
        f"parameters: {plan.params:,} (non-embedding {plan.non_embedding:,}) -> at most {plan.target:,} "
        f"({plan.ratio:.2%} removed); largest reachable ratio with {plan.settings['targets']}: "
        f"{math.floor(plan.largest_ratio * 1000) / 1000:.3f}",
        "settings: " + ", ".join(f"{k} {v}" for k, v in plan.settings.items() if k != "targets"),
        f"weights: {size_text(plan.weight_bytes)} in {plan.dtype}; "
        f"the pruned model at most {size_text(plan.pruned_bytes)}",
        f"weights per rank under --shard (the largest rank): {shards}",
    ]
    if plan.adapter_params is not None:
        lines.append(
            f"lora adapters: {plan.adapter_params:,} parameters, {size_text(plan.adapter_bytes)} with their gradients "
            "and AdamW moments, on every rank"
        )
    state = f"; the search state kept beside it {size_text(plan.state_bytes)}" if plan.state_bytes else ""
    checkpoint = size_text(plan.pruned_bytes + plan.tokenizer_bytes)
    lines.append(f"disk: the checkpoint at most {checkpoint}{state}; at most {size_text(plan.disk_bytes)} at a time")
    lines.append("beyond these: the activations of one step (see --gradient-checkpointing); nothing was loaded")
    return "\n".join(lines)
