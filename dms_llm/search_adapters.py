"""LoRA adapters that train with the keep ratios (``search.mode = lora``), merged before slicing.

The base weights stay frozen; low-rank adapters (peft) on every q/k/v/o/gate/up/down projection
learn to compensate what the masks remove, so the search ranks units by what the model can do once
it has adapted, as in joint mode, at a fraction of its memory: the adapters, their gradients and
Adam moments are ~1% of the weights at r=8. (Training the RMSNorm scales too, as LongLoRA does,
gained ~3% perplexity on stories260K in fp32, but in bfloat16 Adam's updates of ~lr round away
next to 1.0, so they stay frozen rather than behave differently by dtype.) The adapters are kept
in float32 or wider whatever the model's dtype (Adam on bfloat16 adapters loses small updates).

Merging folds ``B @ A * alpha / r`` into each base weight and puts the plain ``nn.Linear`` back,
so the model is an ordinary transformers model of the same shapes and slicing sees nothing new:
an MLP channel or attention unit the masks drop is an input column of ``down_proj``/``o_proj`` and
an output row of ``gate``/``up``/``q``/``k``/``v`` in the merged weight, exactly as in the masked
model with adapters (the masks scale the projection's input before the base and adapter paths).
On a sharded model (``--shard``) each rank adds its rows of peft's delta to its own shard of the
weight, so the gathered weights are those a whole-model merge gives, bit for bit.

Example:
    >>> trained = attach_search_adapters(model, get_adapter(model.config), SearchConfig(mode="lora"))  # doctest: +SKIP
    >>> merge_search_adapters(model)          # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import FamilyAdapter
from .config import SearchConfig
from .errors import DMSError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def require_peft():
    """peft, or one clear line on how to install it (LoRA recovery and the lora search need it)."""
    try:
        import peft
    except ImportError:
        raise DMSError("LoRA needs peft: pip install 'dms-llm[lora]'") from None
    return peft


def attach_search_adapters(model: nn.Module, adapter: FamilyAdapter, config: SearchConfig) -> list[nn.Parameter]:
    """Inject LoRA adapters into every decoder projection of ``model`` in place; returns the
    adapters' parameters (float32 or wider, trainable). Every base weight is left frozen."""
    peft = require_peft()
    names = sorted({getattr(adapter, f"{role}_proj") for role in ROLES})
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # no dropout: q/k/v then share one saved input in the backward
        # only the decoder layers' projections (a family's lm_head or vision tower never)
        target_modules=rf"^{adapter.layers_path.replace('.', '[.]')}[.]\d+[.].*[.]({'|'.join(names)})$",
    )
    peft.inject_adapter_in_model(lora, model)
    trained = []
    for name, parameter in model.named_parameters():
        if ".lora_" in name:  # at least float32 (bf16 Adam loses small updates); float64 stays
            parameter.data = parameter.data.to(torch.promote_types(parameter.dtype, torch.float32))
            parameter.requires_grad_(True)
            trained.append(parameter)
        else:
            parameter.requires_grad_(False)
    if not trained:
        raise DMSError(f"no projection of this {adapter.model_type} model took a LoRA adapter")
    return trained


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their names in ``model`` (what a resumable search state keeps)."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


@torch.no_grad()
def merge_search_adapters(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain layer back; returns how many.

    Each weight is updated in place (its dtype kept), so merging holds no second copy of the model.
    """
    from torch.distributed.tensor import DTensor

    lora_layer = require_peft().tuners.lora.LoraLayer
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, lora_layer)]
    for name, module in wrapped:
        weight = module.get_base_layer().weight
        if isinstance(weight, DTensor):  # a sharded (--shard) layer: each rank adds its own rows
            _merge_into_shard(module, weight)
        else:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # inject_adapter_in_model leaves its config on the model: a later get_peft_model (recovery) would
    # take the merged adapters for live ones ("multiple adapters" warning) and write into that dict
    if hasattr(model, "peft_config"):
        del model.peft_config
    return len(wrapped)


def _merge_into_shard(module: nn.Module, weight) -> None:
    """``module.merge()`` for a base weight that FSDP splits by rows: this rank's rows of peft's own
    delta, added as peft adds it, so the merged shards are those of the merged whole weight."""
    import torch.distributed as dist

    from .sharding import local_rows

    for name in module.active_adapters:
        # the whole delta, then this rank's rows: B[rows] @ A may round differently from (B @ A)[rows],
        # and the merged shards must equal a whole-model merge. The transient is one projection's
        # delta in float32 (under 1 GB for a 70B model's largest), freed before the next.
        delta = module.get_delta_weight(name)
        weight.to_local().add_(delta[local_rows(delta.shape[0], dist.get_rank(), dist.get_world_size())])
        module.merged_adapters.append(name)
