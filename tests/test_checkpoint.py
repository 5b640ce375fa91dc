"""Saving and loading pruned checkpoints: round trips, plain transformers, atomic writes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import STORIES, make_tiny, require_shared
from transformers import AutoTokenizer

from dms_llm.architecture import Architecture
from dms_llm.checkpoint import load_pruned, save_pruned
from dms_llm.errors import DMSError
from dms_llm.slicing import slice_model

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 12, 8, 100, 3]])


def per_layer_arch(units=2, channels=96, layers=4) -> Architecture:
    arch = Architecture.dense([units] * layers, [channels] * layers)
    return Architecture(
        **{
            **arch.to_dict(),
            "kept_layers": [0, 1, 3],
            "kept_units": [[1], [0, 1], [0], [0]],
            "kept_channels": [list(range(0, 96, 2)), list(range(70)), [1], list(range(5, 96))],
        }
    )


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def run_fresh_python(code: str) -> str:
    """Run code in a new interpreter that must not import dms_llm; returns stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    guard = "import sys\nassert 'dms_llm' not in sys.modules\n"
    check = "\nassert 'dms_llm' not in sys.modules, 'dms_llm was imported'\n"
    result = subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(code) + check], capture_output=True, text=True, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2"])
def test_per_layer_round_trip_gives_identical_logits(tmp_path, family):
    model = make_tiny(family)
    slice_model(model, per_layer_arch())
    expected = logits(model)
    out = save_pruned(model, None, tmp_path / "pruned", report={"hello": 1})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "modeling_dms_pruned.py",
        "report.json",
    ]
    loaded = load_pruned(out)
    assert type(loaded).__name__ == type(model).__name__
    assert torch.equal(logits(loaded), expected)


def test_per_layer_loads_with_trust_remote_code_without_dms_llm(tmp_path):
    model = make_tiny("llama_gqa")
    slice_model(model, per_layer_arch())
    torch.save(logits(model), tmp_path / "expected.pt")
    save_pruned(model, None, tmp_path / "pruned")
    out = run_fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "pruned")!r}, trust_remote_code=True)
        with torch.no_grad():
            got = model(torch.tensor({TOKENS.tolist()})).logits
        assert torch.equal(got, torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
        print(type(model).__name__, [l.mlp.down_proj.in_features for l in model.model.layers])
    """)
    assert out.split() == ["DMSLlamaForCausalLM", "[48,", "70,", "91]"]


def test_per_layer_without_trust_remote_code_fails_loudly(tmp_path):
    model = make_tiny("llama_gqa")
    slice_model(model, per_layer_arch())
    save_pruned(model, None, tmp_path / "pruned")
    code = f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "pruned")!r}, trust_remote_code=False)
        except Exception as error:
            print("refused:", type(error).__name__)
    """
    assert "refused" in run_fresh_python(code)


def test_uniform_round_trip_loads_with_plain_transformers(tmp_path, stories):
    model, tokenizer = stories
    arch = Architecture.dense([4] * 5, [172] * 5)
    arch = Architecture(
        **{
            **arch.to_dict(),
            "kept_layers": [0, 1, 2, 4],
            "kept_units": [[0, 3]] * 5,
            "kept_channels": [list(range(0, 172, 2))] * 5,
        }
    )
    slice_model(model, arch, layout="uniform")
    expected = logits(model)
    out = save_pruned(model, tokenizer, tmp_path / "uniform")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and "dms_layer_shapes" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 86)
    assert not (out / "modeling_dms_pruned.py").exists()
    torch.save(expected, tmp_path / "expected.pt")
    run_fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(out)!r}
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            got = model(torch.tensor({TOKENS.tolist()})).logits
        assert torch.equal(got, torch.load({str(tmp_path / "expected.pt")!r}))
        ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
        text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
        assert text.startswith("<s> Once upon a time") or text.startswith("Once upon a time"), text
    """)
    assert torch.equal(logits(load_pruned(out)), expected)


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path):
    model = make_tiny("llama_gqa")
    target = tmp_path / "out"
    save_pruned(model, None, target)
    (target / "keep.txt").write_text("old")
    with pytest.raises(DMSError, match="already exists"):
        save_pruned(model, None, target)
    assert (target / "keep.txt").read_text() == "old"
    save_pruned(model, None, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folders left
    foreign = tmp_path / "foreign"  # a folder dms-llm did not write is never replaced
    foreign.mkdir()
    (foreign / "keep.txt").write_text("theirs")
    with pytest.raises(DMSError, match="only replaces folders written by dms-llm"):
        save_pruned(model, None, foreign, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "theirs"


def test_a_failed_save_leaves_the_old_checkpoint_and_no_partial_folder(tmp_path):
    model = make_tiny("llama_gqa")
    target = tmp_path / "out"
    save_pruned(model, None, target)
    before = (target / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(make_tiny("llama_gqa", seed=9), BrokenTokenizer(), target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
    assert not (target / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_pruned_needs_a_model_folder(tmp_path):
    with pytest.raises(DMSError, match="no config.json"):
        load_pruned(tmp_path)


def test_no_pickles_are_written(tmp_path):
    require_shared()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    out = save_pruned(make_tiny("llama_gqa"), tokenizer, tmp_path / "x")
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
