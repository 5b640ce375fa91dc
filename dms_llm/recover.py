"""Recovery of a pruned model with LoRA (peft), optionally distilled from the dense teacher.

LoRA adapters go on the (already sliced) projections, train on plain text or Alpaca-style
instruction data, and are merged back with ``merge_and_unload`` so the saved model is a plain
checkpoint again (either layout). With a teacher the loss is
``CE + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the teacher frozen.

Example:
    >>> config = RecoverConfig(data="alpaca", steps=200, distill=True)
    >>> model, info = recover(pruned, tokenizer, config, teacher=dense)  # doctest: +SKIP
    >>> info["heldout_before"], info["heldout_after"]                                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import DataConfig, RecoverConfig
from .data import CalibrationData, calibration_blocks
from .errors import DMSError
from .evaluate import perplexity


def _peft():
    try:
        import peft
    except ImportError:
        raise DMSError("LoRA recovery needs peft: pip install 'dms-llm[lora]'") from None
    return peft


def attach_lora(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``config.target_modules`` (base weights frozen)."""
    peft = _peft()
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and return the plain transformers model."""
    merged = peft_model.merge_and_unload()
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` per token, on softened logits."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * temperature**2


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


def train_lora(
    peft_model: nn.Module,
    blocks: torch.Tensor,
    config: RecoverConfig,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> list[dict]:
    """Train the adapters for ``config.steps``; returns the per-step history."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    device = peft_model.get_input_embeddings().weight.device
    if config.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(config.steps * config.batch_size / blocks.shape[0])
    order = torch.cat([torch.randperm(blocks.shape[0], generator=generator) for _ in range(epochs)])
    use_bf16 = config.bf16 and device.type == "cuda"
    history = []
    bar = tqdm(range(config.steps), desc="LoRA recovery", disable=not progress)
    for step in bar:
        batch = blocks[order[step * config.batch_size : (step + 1) * config.batch_size]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            output = peft_model(input_ids=batch, labels=batch, use_cache=False)
            loss = output.loss.float()
            record = {"step": step, "ce": round(loss.item(), 5)}
            if teacher is not None and config.distill_weight > 0:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                kl = distillation_loss(output.logits, teacher_logits, config.distill_temperature)
                loss = loss + config.distill_weight * kl
                record["kl"] = round(kl.item(), 5)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(record)
        bar.set_postfix({k: v for k, v in record.items() if k != "step"})
        if checkpoint_dir and config.save_every and (step + 1) % config.save_every == 0:
            peft_model.save_pretrained(Path(checkpoint_dir) / f"step-{step + 1}")  # adapter safetensors
    if config.gradient_checkpointing:
        peft_model.gradient_checkpointing_disable()
    peft_model.eval()
    return history


def recover(
    model: nn.Module,
    tokenizer,
    config: RecoverConfig,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    data: CalibrationData | None = None,
) -> tuple[nn.Module, dict]:
    """LoRA-recover ``model`` and merge; returns (plain model, info with held-out perplexities)."""
    if config.distill and teacher is None:
        raise DMSError("distillation needs the dense teacher model (--teacher, or the base model in report.json)")
    data = data or recovery_data(tokenizer, config, seed)
    evaluate = data.heldout.numel() >= config.seq_len
    before = perplexity(model, data.heldout, config.seq_len) if evaluate else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    start = time.perf_counter()
    peft_model = attach_lora(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    history = train_lora(
        peft_model, data.calib, config, teacher if config.distill else None, seed, progress, checkpoint_dir
    )
    merged = merge_lora(peft_model)
    info = {
        "method": "lora",
        "data": config.data,
        "steps": config.steps,
        "lora_r": config.lora_r,
        "trainable_params": trainable,
        "distill": bool(config.distill),
        "seconds": round(time.perf_counter() - start, 2),
        "heldout_seq_len": config.seq_len,
        "heldout_before": before,
        "heldout_after": perplexity(merged, data.heldout, config.seq_len) if evaluate else None,
        "history": history[:: max(1, len(history) // 50)],
    }
    return merged, info
