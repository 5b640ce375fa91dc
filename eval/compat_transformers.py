"""Pruned checkpoints in older transformers: which versions compute what transformers 5 computes.

    python eval/compat_transformers.py                          # every version below
    python eval/compat_transformers.py --versions 4.46.3,4.57.1

Each transformers 4.x gets its own virtual environment (torch and transformers only: no
dms-llm), made once under ``--work-dir``. The checkpoints are written by the real CLI
(``dms-llm prune``) from stories260K and from random-weight Llama-3.1-style (GQA, ``llama3``
RoPE), Mistral (sliding window) and Qwen2 (biases) models whose config.json has the 4.x form the
Hub ships. Each version loads each checkpoint (``trust_remote_code=True``) and computes the
logits of 64 tokens and a greedy 8-token continuation; a cell says "same" when the logits are
within 1e-5 of transformers 5's and the continuation is identical. mlx-lm (MLX's CPU build runs
on Linux) gets the same checkpoints in its own environment: what a Mac laptop user loads them with.

The model card states, per checkpoint, the oldest version to use
(``dms_llm.config_compat.oldest_transformers``); this script fails when any version from that one
on does not give the same outputs. Writes eval/results/compat.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
TEXT = SHARED / "text" / "tinystories" / "validation_a.txt"
CLIENT = Path(__file__).with_name("transformers_client.py")
VERSIONS = ("4.38.2", "4.43.4", "4.45.2", "4.46.3", "4.48.3", "4.57.1")
MLX, MLX_LM = "0.32.4", "0.32.2"
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}  # fmt: skip


def hub_style_model(family: str, folder: Path) -> Path:
    """A random model saved with the 4.x config keys only, as Hub checkpoints are."""
    import transformers
    from transformers import AutoTokenizer

    from dms_llm.config_compat import add_legacy_keys

    if (folder / "model.safetensors").exists():
        return folder
    common = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                  vocab_size=512, max_position_embeddings=1024)  # fmt: skip
    config = {
        "llama3": transformers.LlamaConfig(**common, num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE)),
        "mistral": transformers.MistralConfig(**common, num_key_value_heads=4, sliding_window=32, rope_theta=1e6),
        "qwen2": transformers.Qwen2Config(**common, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False),
    }[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    add_legacy_keys(folder)
    drop_config_keys(folder, ("rope_parameters", "dtype"))
    return folder


def drop_config_keys(folder: Path, keys: tuple[str, ...]) -> None:
    """Remove ``keys`` from ``folder/config.json``: one version's spelling of the RoPE settings."""
    config = json.loads((folder / "config.json").read_text())
    for key in keys:
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def prune(model: Path, out: Path, layout: str, extra: list[str]) -> Path:
    if not (out / "config.json").exists():
        command = ["dms-llm", "prune", str(model), "--layout", layout, "--calib", str(TEXT), "--quiet", "--no-eval",
                   "--steps", "30", "--num-blocks", "32", "--seq-len", "64", "-o", str(out), *extra]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def checkpoints(work: Path) -> dict[str, Path]:
    made = {"stories260K dense": STORIES}
    for layout in ("per_layer", "uniform"):
        made[f"stories260K {layout}"] = prune(STORIES, work / f"stories-{layout}", layout, ["--ratio", "0.3"])
    for family in ("llama3", "mistral", "qwen2"):
        base = hub_style_model(family, work / f"{family}-dense")
        made[f"{family} dense"] = base
        for layout in ("per_layer", "uniform"):
            extra = ["--ratio", "0.35"]
            made[f"{family} {layout}"] = prune(base, work / f"{family}-{layout}", layout, extra)
    for layout in ("per_layer", "uniform"):  # the defect this guards against
        before = work / f"llama3-{layout}-5x-keys-only"
        if not before.exists():
            shutil.copytree(made[f"llama3 {layout}"], before)
            drop_config_keys(before, ("rope_theta", "rope_scaling", "torch_dtype"))
        made[f"llama3 {layout}, config.json as transformers 5 alone writes it"] = before
    return made


def environment(work: Path, name: str, packages: list[str]) -> Path:
    """A virtual environment under ``work`` with only ``packages`` (made once)."""
    python = work / name / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(python.parents[1])], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return python


def transformers_environment(work: Path, version: str) -> Path:
    torch_version = torch.__version__.split("+")[0]
    return environment(work, f"transformers-{version}", [f"torch=={torch_version}", f"transformers=={version}"])


def mlx_outputs(work: Path, folders: list[Path], tokens: torch.Tensor) -> dict:
    """mlx-lm's logits (its CPU build), as a Mac laptop user would load the checkpoints."""
    python = environment(work, f"mlx-lm-{MLX_LM}", [f"mlx[cpu]=={MLX}", f"mlx-lm=={MLX_LM}"])
    out = work / "mlx.json"
    subprocess.run([str(python), str(CLIENT.with_name("mlx_client.py")), str(out), json.dumps(tokens.tolist()),
                    *map(str, folders)], check=True, cwd=work, stderr=subprocess.DEVNULL)  # fmt: skip
    report = json.loads(out.read_text())
    results = {
        folder: {"logits": torch.tensor(got["logits"])} if "logits" in got else got
        for folder, got in report["results"].items()
    }
    return {"version": report["version"], "results": results}


def outputs(python: Path, folders: list[Path], tokens: torch.Tensor, work: Path) -> dict:
    out = work / "outputs.pt"
    subprocess.run([str(python), str(CLIENT), str(out), json.dumps(tokens.tolist()), *map(str, folders)],
                   check=True, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return torch.load(out)


def describe(config: dict) -> dict:
    from dms_llm.config_compat import oldest_transformers

    shapes = config.get("dms_layer_shapes")
    heads = [s["num_key_value_heads"] for s in shapes] if shapes else [config["num_key_value_heads"]]
    return {"KV heads per layer": "/".join(map(str, heads)) if shapes else f"{heads[0]} each (stock config)",
            "oldest on the card": oldest_transformers(config)}  # fmt: skip


def cell(result: dict, reference: dict, atol: float = 1e-5) -> str:
    if "error" in result:
        return f"refused ({result['error'].split(':')[0]})"
    difference = (result["logits"] - reference["logits"]).abs().max().item()
    same_continuation = "generated" not in result or torch.equal(result["generated"], reference["generated"])
    if difference <= atol and same_continuation:
        return "same"
    return f"differs ({difference:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", default=",".join(VERSIONS))
    parser.add_argument("--no-mlx", action="store_true", help="skip the mlx-lm column")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dms-llm-compat"))
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "compat")
    args = parser.parse_args()
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from transformers_client import run

    args.work_dir.mkdir(parents=True, exist_ok=True)
    made = checkpoints(args.work_dir)
    tokens = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    reference = {name: run(str(folder), tokens) for name, folder in made.items()}  # transformers 5, here
    rows = {name: describe(json.loads((folder / "config.json").read_text())) for name, folder in made.items()}
    versions = args.versions.split(",")
    for version in versions:
        got = outputs(transformers_environment(args.work_dir, version), list(made.values()), tokens, args.work_dir)
        print(f"transformers {got['version']}", file=sys.stderr, flush=True)
        for name, folder in made.items():
            rows[name][version] = cell(got["results"][str(folder)], reference[name])
    columns = list(versions)
    if not args.no_mlx:  # another framework's float kernels: logits agree to 1e-4, not 1e-5
        got = mlx_outputs(args.work_dir, list(made.values()), tokens)
        columns.append(f"mlx-lm {got['version']}")
        for name, folder in made.items():
            rows[name][columns[-1]] = cell(got["results"][str(folder)], reference[name], atol=1e-4)
    broken = [
        f"{name} in {version}"
        for name, row in rows.items()
        if "alone writes" not in name
        for version in versions
        if Version(version) >= Version(row["oldest on the card"]) and row[version] != "same"
    ]
    machine = f"{platform.machine()} CPU, torch {torch.__version__}, reference transformers {transformers.__version__}"
    header = ["checkpoint", "KV heads per layer", "oldest on the card", *columns]
    lines = [
        f"Pruned checkpoints loaded with `from_pretrained(..., trust_remote_code=True)` in each transformers "
        f"version's own environment (no dms-llm), against transformers {transformers.__version__}: 'same' = "
        "logits within 1e-5 and the same greedy continuation; 'differs (x)': the largest logit difference. "
        "Checkpoints written by `dms-llm prune` (heads and channels pruned); the random models' config.json "
        "has the 4.x form the Hub ships. Last column: mlx-lm (Apple's MLX; its CPU build, on this machine) "
        "loading each folder with its own model code, logits within 1e-4 (another framework's kernels); it has "
        "no per-layer shapes (the per-layer layout is for transformers and llama.cpp), reads no head_dim for Qwen2 "
        "and ignores Mistral's sliding window, its dense model's too (here 32 tokens of the 64; in Mistral-7B-v0.1 "
        "4,096).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join([name, *(row[h] for h in header[1:])]) + " |" for name, row in rows.items()),
        "",
        f"Machine: {machine}. Command: `python eval/compat_transformers.py`.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    if broken:
        sys.exit("the model card's oldest version is wrong for: " + "; ".join(broken))


if __name__ == "__main__":
    main()
