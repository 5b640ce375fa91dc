"""Recovery of a pruned model with LoRA (peft), optionally distilled from the dense model.

LoRA adapters go on the (already sliced) projections, train on plain text or Alpaca-style
instruction data, and are merged back with ``merge_and_unload`` so the saved model is a plain
checkpoint again (either layout). With distillation the loss is
``CE + w * T^2 * KL(teacher || student)`` over the teacher's top-k tokens and the rest (see
``losses``). The teacher is never a second model in memory: ``recovery_teacher`` runs the dense
model over the recovery blocks once, before it is pruned (``prune``) or before the pruned model
is loaded (``dms-llm recover``), and keeps only its top-k log-probabilities.

Example:
    >>> config = RecoverConfig(data="alpaca", steps=200, distill=True)
    >>> data, targets = recovery_teacher(dense, tokenizer, config)     # doctest: +SKIP
    >>> model, info = recover(pruned, tokenizer, config, targets, data=data)  # doctest: +SKIP
    >>> info["heldout_before"], info["heldout_after"]                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .activation_checkpointing import set_activation_checkpointing
from .checkpoint import files_follow_umask
from .config import DataConfig, RecoverConfig
from .data import CalibrationData, calibration_blocks
from .errors import DMSError
from .evaluate import perplexity
from .losses import TeacherTargets, causal_lm_loss, teacher_targets
from .recover_state import require_checkpoint, restore_checkpoint, save_checkpoint
from .search_adapters import require_peft


def attach_lora(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``config.target_modules`` (base weights frozen)."""
    peft = require_peft()
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecates: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, lora)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and return the plain transformers model."""
    merged = peft_model.merge_and_unload()
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged


def recovery_data(tokenizer, config: RecoverConfig, seed: int = 0) -> CalibrationData:
    data = DataConfig(
        calib=config.data,
        split=config.split,
        text_field=config.text_field,
        num_blocks=config.num_blocks,
        seq_len=config.seq_len,
        heldout_fraction=config.heldout_fraction,
    )
    return calibration_blocks(tokenizer, data, seed=seed)


def recovery_teacher(
    dense: nn.Module, tokenizer, config: RecoverConfig, seed: int = 0
) -> tuple[CalibrationData, TeacherTargets]:
    """The recovery blocks and the dense model's top-k log-probabilities on them (one pass)."""
    data = recovery_data(tokenizer, config, seed)
    return data, teacher_targets(dense, data.calib, config.distill_topk, config.distill_temperature)


def train_lora(
    peft_model: nn.Module,
    blocks: torch.Tensor,
    config: RecoverConfig,
    teacher: TeacherTargets | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> list[dict]:
    """Train the adapters for ``config.steps``; returns the per-step history.

    Every ``config.save_every`` steps a resumable adapter checkpoint goes to
    ``checkpoint_dir/step-N`` (``recover_state``); with ``resume`` the training continues from the
    latest one there and ends with the adapters an uninterrupted run ends with.
    """
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    device = peft_model.get_input_embeddings().weight.device
    if config.gradient_checkpointing:
        set_activation_checkpointing(peft_model, True)
        peft_model.enable_input_require_grads()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(config.steps * config.batch_size / blocks.shape[0])
    order = torch.cat([torch.randperm(blocks.shape[0], generator=generator) for _ in range(epochs)])
    use_bf16 = config.bf16 and device.type == "cuda"
    # what a checkpoint must agree on to continue this run (save_every may change between runs)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "save_every"}
    adapter_params = sum(p.numel() for p in trainable)
    fingerprint = {**settings, "seed": seed, "blocks": list(blocks.shape), "adapter_params": adapter_params}
    first, history = 0, []
    if resume:
        latest = require_checkpoint(checkpoint_dir)
        first, history = restore_checkpoint(latest, peft_model, optimizer, schedule, fingerprint)
    steps = range(first, config.steps)
    bar = tqdm(steps, initial=first, total=config.steps, desc="LoRA recovery", disable=not progress)
    kd_weight = config.distill_weight if teacher is not None else 0.0
    model = peft_model.get_base_model()  # the causal LM with the adapters inside its projections
    for step in bar:
        rows = order[step * config.batch_size : (step + 1) * config.batch_size]
        batch = blocks[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, (ce, kl) = causal_lm_loss(model, batch, teacher.select(rows) if kd_weight else None, kd_weight)
        record = {"step": step, "ce": round(ce.item(), 5)}
        if kd_weight:
            record["kl"] = round(kl.item(), 5)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(record)
        bar.set_postfix({k: v for k, v in record.items() if k != "step"})
        if checkpoint_dir and config.save_every and (step + 1) % config.save_every == 0:
            saved = Path(checkpoint_dir) / f"step-{step + 1}"
            save_checkpoint(saved, peft_model, optimizer, schedule, step + 1, history, fingerprint)
            files_follow_umask(saved)
    if config.gradient_checkpointing:
        set_activation_checkpointing(peft_model, False)
    peft_model.eval()
    return history


def recover(
    model: nn.Module,
    tokenizer,
    config: RecoverConfig,
    teacher: TeacherTargets | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    data: CalibrationData | None = None,
    resume: bool = False,
) -> tuple[nn.Module, dict]:
    """LoRA-recover ``model`` and merge; returns (plain model, info with held-out perplexities).

    With ``config.distill``, ``teacher`` holds the dense model's targets on ``data.calib`` (see
    ``recovery_teacher``). ``checkpoint_dir`` and ``resume``: see ``train_lora``.
    """
    if config.distill and teacher is None:
        raise DMSError("distillation needs the dense teacher model (--teacher, or the base model in report.json)")
    data = data or recovery_data(tokenizer, config, seed)
    if teacher is not None and teacher.indices.shape[0] != data.calib.shape[0]:
        raise ValueError("the teacher targets were computed on other blocks than the recovery data")
    evaluate = data.heldout.numel() >= config.seq_len
    before = perplexity(model, data.heldout, config.seq_len) if evaluate else None
    start = time.perf_counter()
    torch.manual_seed(seed)  # the adapters' random init: the same seed gives the same recovered model
    peft_model = attach_lora(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    history = train_lora(
        peft_model, data.calib, config, teacher if config.distill else None, seed, progress, checkpoint_dir, resume
    )
    merged = merge_lora(peft_model)
    info = {
        "method": "lora",
        "data": config.data,
        "steps": config.steps,
        "lora_r": config.lora_r,
        "trainable_params": trainable,
        "distill": bool(config.distill),
        "distill_topk": config.distill_topk if config.distill else None,
        "seconds": round(time.perf_counter() - start, 2),
        "heldout_seq_len": config.seq_len,
        "heldout_before": before,
        "heldout_after": perplexity(merged, data.heldout, config.seq_len) if evaluate else None,
        "history": history[:: max(1, len(history) // 50)],
    }
    return merged, info
