"""Resumable search state: keep ratios, importances, frozen masks, optimizer, step, RNG, history.

Tensors go to ``state.safetensors`` and everything else to ``state.json`` in one folder, written
to a temporary folder and renamed into place, so a run killed while saving leaves the previous
state intact. Nothing is pickled. A state only resumes a run with the same settings.

Example:
    >>> save_state(folder, step=120, masks=masks, optimizer=optimizer, extra={...})   # doctest: +SKIP
    >>> state = load_state(folder)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .disk_space import staged_folder
from .errors import DMSError

TENSORS = "state.safetensors"
META = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """An optimizer's state as (tensors named ``prefix.INDEX.NAME``, JSON-able rest): no pickle."""
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        meta["state"][str(index)] = []
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().cpu().contiguous()
                meta["state"][str(index)].append(name)
    return tensors, meta


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    """Load what ``optimizer_tensors`` wrote back into ``optimizer``."""
    state = {
        int(index): {name: tensors[f"{prefix}.{index}.{name}"] for name in names}
        for index, names in meta["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(
    folder: str | Path,
    step: int,
    masks,
    optimizers: dict[str, torch.optim.Optimizer],
    meta: dict,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the state after ``step`` steps (atomic: temporary folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(folder, "the search state") as staging:  # a full disk keeps the previous state
        staging.mkdir()
        _write_state(staging, step, masks, optimizers, meta, weights)


def _write_state(staging: Path, step: int, masks, optimizers: dict, meta: dict, weights: dict | None) -> None:
    tensors = {f"masks.{k}": v.detach().cpu().contiguous().float() for k, v in masks.state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        moments, optimizer_meta[name] = optimizer_tensors(optimizer, f"optim.{name}")
        tensors.update(moments)
    seen = set()
    for name, value in (weights or {}).items():
        if value.data_ptr() in seen:  # tied weights (embeddings / lm_head) are stored once
            continue
        seen.add(value.data_ptr())
        # no copy on the host: safetensors only reads the tensor (from a GPU, .cpu() is the copy)
        tensors[f"weights.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(staging / TENSORS))
    (staging / META).write_text(json.dumps({**meta, "step": step, "optimizers": optimizer_meta}) + "\n")


def load_state(folder: str | Path) -> tuple[dict, dict] | None:
    """(tensors, meta) of a saved state, or None when the folder holds none."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        return None
    return load_file(str(folder / TENSORS)), json.loads((folder / META).read_text())


def restore_state(
    tensors: dict, meta: dict, masks, optimizers: dict[str, torch.optim.Optimizer], fingerprint: dict
) -> int:
    """Load a state into ``masks`` and ``optimizers``; returns the step to continue from."""
    if meta.get("fingerprint") != fingerprint:
        changed = sorted(
            k
            for k in set(fingerprint) | set(meta.get("fingerprint", {}))
            if fingerprint.get(k) != meta.get("fingerprint", {}).get(k)
        )
        raise DMSError(
            f"the saved search state was made with different settings ({', '.join(changed)}); "
            "rerun without --resume, or with the original settings"
        )
    device = masks.keep_ratios[masks.targets[0]].device
    mask_state = {k[len("masks.") :]: v.to(device) for k, v in tensors.items() if k.startswith("masks.")}
    mask_state["layer_scores_external"] = mask_state["layer_scores_external"].bool()
    masks.load_state_dict(mask_state)
    for name, optimizer in optimizers.items():
        restore_optimizer(optimizer, tensors, meta["optimizers"][name], f"optim.{name}")
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    return int(meta["step"])


def saved_weights(tensors: dict) -> dict[str, torch.Tensor]:
    return {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
