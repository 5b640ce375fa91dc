"""Adapter checkpoints of a LoRA recovery that resume exactly: ``--save-every N``, then ``--resume``.

Each ``step-N`` folder is a plain peft adapter (``adapter_model.safetensors`` and
``adapter_config.json``: ``PeftModel.from_pretrained`` loads it) plus what continues the training
where it stopped: AdamW's moments and the RNG in ``training_state.safetensors``; the step, the
learning-rate schedule, the loss history and the settings' fingerprint in ``training_state.json``.
The data order is a function of the seed, so a resumed run takes the same batches and ends with the
same adapters as one that was never interrupted. A folder is written under a temporary name and
renamed into place: a run killed while saving leaves the earlier checkpoints intact. Nothing is
pickled.

Example:
    >>> save_checkpoint(folder, peft_model, optimizer, schedule, 50, history, fingerprint)  # doctest: +SKIP
    >>> latest = latest_checkpoint("out-lora-checkpoints")                                 # doctest: +SKIP
    >>> step, history = restore_checkpoint(latest, peft_model, optimizer, schedule, fingerprint)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RecoverConfig
from .disk_space import staged_folder
from .errors import DMSError
from .search_state import optimizer_tensors, restore_optimizer

ADAPTER = "adapter_model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_META = "training_state.json"
STEP_FOLDER = re.compile(r"step-(\d+)")


def save_checkpoint(
    folder: str | Path,
    peft_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    history: list[dict],
    fingerprint: dict,
) -> None:
    """Write the adapters and the training state after ``step`` steps into ``folder`` (atomic)."""
    folder = Path(folder)
    try:
        with staged_folder(folder, "the adapter checkpoint") as staging:
            peft_model.save_pretrained(staging)  # creates the checkpoints folder too
            tensors, optimizer_meta = optimizer_tensors(optimizer, "optim")
            tensors["rng.torch"] = torch.get_rng_state()
            device = next(p.device for p in peft_model.parameters() if p.requires_grad)
            if device.type == "cuda":  # dropout on a GPU draws from its own generator
                tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
            save_file(tensors, str(staging / STATE_TENSORS))
            meta = {
                "step": step,
                "history": history,
                "optimizer": optimizer_meta,
                "schedule": schedule.state_dict(),
                "fingerprint": fingerprint,
            }
            (staging / STATE_META).write_text(json.dumps(meta) + "\n")
    except BaseException:
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()  # no empty checkpoints folder either
        raise


def adapter_bytes(model: nn.Module, config: RecoverConfig) -> int:
    """Bytes of one saved adapter: ``r x (in + out)`` values per targeted projection.

    peft keeps (and saves) adapters in float32 even on a bfloat16 model. ``model`` may live on the
    meta device: only the projections' shapes are read.

    Example:
        >>> adapter_bytes(empty_model(load_config("stories260K")), RecoverConfig())  # doctest: +SKIP
        193536
    """
    targets = set(config.target_modules)
    values = sum(
        config.lora_r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return values * torch.finfo(torch.float32).bits // 8


def checkpoint_bytes(model: nn.Module, config: RecoverConfig) -> int:
    """Bytes of one ``step-N`` checkpoint: the adapter and AdamW's two moments of the same size."""
    return 3 * adapter_bytes(model, config)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The complete ``step-N`` folder with the highest N, or None when there is none."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    complete = [
        (int(match.group(1)), child)
        for child in folder.iterdir()
        if (match := STEP_FOLDER.fullmatch(child.name))
        and all((child / name).is_file() for name in (ADAPTER, STATE_TENSORS, STATE_META))
    ]
    return max(complete)[1] if complete else None


def require_checkpoint(checkpoint_dir: str | Path | None) -> Path:
    """The latest checkpoint in ``checkpoint_dir``; a DMSError saying what to do when there is none."""
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is None:
        raise DMSError(
            f"--resume: {str(checkpoint_dir)!r} holds no adapter checkpoint to continue from; run without "
            "--resume (with --save-every N a run keeps checkpoints there)"
        )
    return latest


def restore_checkpoint(
    folder: str | Path,
    peft_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict,
) -> tuple[int, list[dict]]:
    """Load a checkpoint into the adapters, optimizer, schedule and RNG; returns (step, history)."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    meta = json.loads((folder / STATE_META).read_text())
    saved = meta.get("fingerprint", {})
    changed = sorted(key for key in set(fingerprint) | set(saved) if fingerprint.get(key) != saved.get(key))
    if changed:
        raise DMSError(
            f"the adapter checkpoint {str(folder)!r} was made with different settings ({', '.join(changed)}); "
            "rerun with the original settings, or without --resume to start over"
        )
    device = next(p.device for p in peft_model.parameters() if p.requires_grad)
    set_peft_model_state_dict(peft_model, load_file(str(folder / ADAPTER), device=str(device)))
    tensors = load_file(str(folder / STATE_TENSORS))
    restore_optimizer(optimizer, tensors, meta["optimizer"], "optim")
    schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return int(meta["step"]), list(meta["history"])
