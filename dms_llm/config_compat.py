"""A ``config.json`` that transformers 4.x reads the same way as transformers 5.x.

transformers 5 writes RoPE settings only as ``rope_parameters`` (``{"rope_type", "rope_theta",
...}``) and the weight type as ``dtype``. transformers 4.x (and every tool pinned to it: vLLM,
TGI and other servers of their day) knows neither key: it ignores them and silently falls back to
``rope_theta = 10000`` with no scaling. For Llama-3 (theta 500,000 and ``llama3`` scaling) the
pruned model then loads without a word and computes something else. The original Hub checkpoints
carry the 4.x keys, so a pruned one must as well: this module adds them beside the 5.x ones.

transformers 5 reads both forms and gives the legacy ``rope_scaling`` precedence, so the values
written here are exactly those of ``rope_parameters`` (a tested round trip).

Example:
    >>> legacy = with_legacy_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "dtype": "bfloat16"})
    >>> legacy["rope_theta"], legacy["rope_scaling"], legacy["torch_dtype"]
    (500000.0, None, 'bfloat16')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def with_legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus the 4.x spellings of its RoPE settings and dtype (existing keys are kept)."""
    out = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("rope_type"), str):  # one global RoPE, not one per layer type
        if rope.get("rope_theta") is not None:
            out.setdefault("rope_theta", rope["rope_theta"])
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        # 4.x expects no scaling dict at all for plain RoPE (4.40-4.42 reject any other dict)
        out.setdefault("rope_scaling", None if scaling["rope_type"] == "default" else scaling)
    if config.get("dtype") is not None:
        out.setdefault("torch_dtype", config["dtype"])
    return out


def add_legacy_keys(folder: str | Path) -> None:
    """Rewrite ``folder/config.json`` with :func:`with_legacy_keys` (keys sorted, as transformers writes them)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    updated = with_legacy_keys(config)
    if updated != config:
        path.write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n")


# the oldest transformers that computes what transformers 5 computes, by what a checkpoint uses;
# each entry was checked by eval/compat_transformers.py (results in eval/results/compat.md)
OLDEST_CHECKED = (4, 38)  # the oldest tried; the per-layer modeling file needs Qwen2 (4.37) anyway
SCALED_ROPE = (4, 43)  # rope_type keys (llama3, yarn, ...): 4.40-4.42 accept only {"type", "factor"}
MISTRAL = (4, 43)  # sliding-window attention (a dense Mistral already differs in 4.38)
HEAD_DIM = {"llama": (4, 45), "mistral": (4, 43), "qwen2": (4, 48)}  # configs read ``head_dim`` from


def oldest_transformers(config: dict[str, Any]) -> str:
    """The oldest transformers version that loads ``config``'s checkpoint with transformers 5's outputs.

    >>> oldest_transformers({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 8})
    '4.45'
    """
    needed = [OLDEST_CHECKED]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        needed.append(SCALED_ROPE)
    family = config.get("model_type")
    if family == "mistral":
        needed.append(MISTRAL)
    head_dim, heads = config.get("head_dim"), config.get("num_attention_heads")
    if head_dim and heads and head_dim * heads != config.get("hidden_size"):  # pruned heads in a stock config
        needed.append(HEAD_DIM.get(family, max(HEAD_DIM.values())))
    return "{}.{}".format(*max(needed))
