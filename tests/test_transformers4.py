"""Pruned checkpoints read by transformers 4.x: the same logits and generations as transformers 5.

transformers 5 writes RoPE settings only as ``rope_parameters``; 4.x ignores that key and loads a
Llama-3 checkpoint with theta 10,000 and no scaling, silently. ``config_compat`` adds the 4.x keys
and the per-layer modeling file sets the per-layer counts that 4.x attention reshapes by.

The first tests read the written config.json the way 4.x does (only the keys it knows) inside
transformers 5. The last runs real transformers 4.x installs, without dms-llm: ``.ci/run`` makes
them and names their Pythons in ``TRANSFORMERS4_PYTHONS`` (``os.pathsep``-separated).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from packaging.version import Version
from test_checkpoint import TOKENS, per_layer_arch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dms_llm.architecture import Architecture
from dms_llm.checkpoint import save_pruned
from dms_llm.config_compat import oldest_transformers, with_legacy_keys
from dms_llm.slicing import slice_model

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}  # fmt: skip
CLIENT = Path(__file__).resolve().parents[1] / "eval" / "transformers_client.py"
PYTHONS = [p for p in os.environ.get("TRANSFORMERS4_PYTHONS", "").split(os.pathsep) if p]


def _llama3(seed: int = 0):
    """The tiny GQA Llama (8 heads in 2 KV groups, head_dim 8) with Llama-3.1's RoPE."""
    config = make_tiny("llama_gqa").config
    config.rope_parameters = dict(LLAMA3_ROPE)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _uniform_half_heads() -> Architecture:
    """One of two KV groups in every layer: a stock config whose head_dim is not hidden / heads."""
    arch = Architecture.dense([2] * 4, [96] * 4)
    return Architecture(**{**arch.to_dict(), "kept_units": [[1]] * 4, "kept_channels": [list(range(60))] * 4})


CASES = {  # name: (model builder, architecture, layout)
    "llama3_per_layer": (_llama3, per_layer_arch, "per_layer"),
    "llama3_uniform": (_llama3, _uniform_half_heads, "uniform"),
    "mistral_per_layer": (lambda: make_tiny("mistral"), per_layer_arch, "per_layer"),
    "qwen2_per_layer": (lambda: make_tiny("qwen2"), per_layer_arch, "per_layer"),
    "qwen2_uniform": (lambda: make_tiny("qwen2"), _uniform_half_heads, "uniform"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Each case saved by save_pruned, with transformers 5's logits and greedy continuation."""
    folder, saved = tmp_path_factory.mktemp("compat"), {}
    for name, (build, arch, layout) in CASES.items():
        model = build()
        slice_model(model, arch(), layout)
        with torch.no_grad():
            expected = model(TOKENS).logits, model.generate(TOKENS, max_new_tokens=8, do_sample=False)[:, 10:]
        saved[name] = (save_pruned(model, None, folder / name), *expected)
    return saved


def _logits_of(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _as_read_by(folder: Path, keys: str, tmp_path: Path) -> Path:
    """A copy of the checkpoint whose config.json keeps only the RoPE/dtype keys of one version."""
    copy = tmp_path / f"{folder.name}-{keys}"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    for key in ("rope_parameters", "dtype") + (("rope_theta", "rope_scaling", "torch_dtype") if keys == "none" else ()):
        config.pop(key, None)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("name", ["llama3_per_layer", "llama3_uniform"])
def test_the_4x_keys_alone_give_the_same_model(checkpoints, name, tmp_path):
    folder, expected, _ = checkpoints[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["torch_dtype"] == "float32"
    assert config["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert torch.equal(_logits_of(folder), expected)  # transformers 5 reads both spellings the same
    assert torch.equal(_logits_of(_as_read_by(folder, "legacy", tmp_path)), expected)
    # what a 4.x reader got before: defaults instead of the model's RoPE, and other logits
    assert not torch.allclose(_logits_of(_as_read_by(folder, "none", tmp_path)), expected, atol=1e-3)


def test_plain_rope_gets_no_scaling_dict():
    # transformers 4.40-4.42 refuse any rope_scaling dict but {"type", "factor"}: plain RoPE writes null
    legacy = with_legacy_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert legacy["rope_scaling"] is None and legacy["rope_theta"] == 1e4
    nested = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert with_legacy_keys(nested) == nested  # per-layer-type RoPE has no 4.x spelling: left alone


def test_oldest_version_follows_what_the_checkpoint_uses(checkpoints):
    configs = {name: json.loads((folder / "config.json").read_text()) for name, (folder, *_) in checkpoints.items()}
    oldest = {name: oldest_transformers(config) for name, config in configs.items()}
    assert oldest == {
        "llama3_per_layer": "4.43",  # llama3 RoPE scaling
        "llama3_uniform": "4.45",  # head_dim read from the config
        "mistral_per_layer": "4.43",
        "qwen2_per_layer": "4.38",
        "qwen2_uniform": "4.48",
    }


@pytest.mark.parametrize("python", PYTHONS or [None])
def test_transformers4_computes_what_transformers5_computes(checkpoints, python, tmp_path):
    if python is None:
        pytest.skip("no transformers 4.x install: TRANSFORMERS4_PYTHONS is unset (.ci/run sets it)")
    out = tmp_path / "results.pt"
    folders = [str(folder) for folder, *_ in checkpoints.values()]
    done = subprocess.run(
        [python, str(CLIENT), str(out), json.dumps(TOKENS.tolist()), *folders],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = torch.load(out)
    version, checked = Version(report["version"]), 0
    assert version < Version("5"), report["version"]
    for name, (folder, logits, generated) in checkpoints.items():
        result = report["results"][str(folder)]
        if version < Version(oldest_transformers(json.loads((folder / "config.json").read_text()))):
            continue  # older than the model card promises: nothing is claimed
        assert "error" not in result, f"{name} in transformers {report['version']}: {result.get('error')}"
        torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(result["generated"], generated), name
        checked += 1
    assert checked >= 4  # 4.46 and later read all but the Qwen2 stock config with pruned heads
