"""Run by a Python with mlx-lm (Apple's MLX; its CPU build runs on Linux): logits of checkpoints.

    python eval/mlx_client.py OUT.json TOKENS_JSON FOLDER [FOLDER ...]

Writes {"version": ..., "results": {folder: {"logits": nested lists} or {"error": ...}}} as JSON.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model


def run(folder: str, tokens: list) -> dict:
    try:
        model, _ = load_model(Path(folder))
        return {"logits": np.array(model(mx.array(tokens)).astype(mx.float32)).tolist()}
    except Exception as error:  # recorded: mlx-lm has no per-layer shapes, for one
        return {"error": f"{type(error).__name__}: {error}"[:500]}


if __name__ == "__main__":
    out, tokens = sys.argv[1], json.loads(sys.argv[2])
    results = {folder: run(folder, tokens) for folder in sys.argv[3:]}
    Path(out).write_text(json.dumps({"version": version("mlx-lm"), "results": results}))
