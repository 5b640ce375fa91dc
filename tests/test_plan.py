"""``dms-llm prune --dry-run``: exact counts and weight memory from the config, nothing loaded or written."""

import json
import shutil

import pytest
import torch
from conftest import STORIES, TINYSTORIES, require_shared
from transformers import AutoModelForCausalLM

import dms_llm.checkpoint
from dms_llm.adapters import get_adapter
from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.cli import main
from dms_llm.config import PruneConfig, SearchConfig
from dms_llm.plan import prune_plan, render_plan
from dms_llm.search_adapters import attach_search_adapters

LLAMA_2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}


def _config_folder(tmp_path, config: dict):
    """A model folder with a config and a tokenizer, and no weights at all."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for file in STORIES.iterdir():
        if file.name.startswith("tokenizer"):
            shutil.copy(file, folder / file.name)
    return folder


def test_dry_run_prints_the_real_counts_and_loads_and_writes_nothing(tmp_path, monkeypatch, capsys):
    require_shared()
    monkeypatch.chdir(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("--dry-run loaded the weights")

    monkeypatch.setattr(dms_llm.checkpoint, "load_model", no_loading)
    argv = ["prune", str(STORIES), "--ratio", "0.3", "--calib", str(TINYSTORIES), "-o", "out", "--dry-run"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no folder, no lock, no search state
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    adapter = get_adapter(model.config)
    counter = ParamCounter.from_model(model, adapter)
    budget = resolve_budget(counter, ratio=0.3)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    counts = f"parameters: {counter.total:,} (non-embedding {counter.non_embedding:,}) -> at most {budget.target:,}"
    assert counts in printed
    assert f"weights: {weights / 1024:.2f} KiB in float32" in printed
    assert "mode lora, loss task+kd" in printed and "1024 blocks x 128 tokens" in printed
    adapters = attach_search_adapters(model, adapter, SearchConfig(mode="lora"))  # the real model's adapters
    assert f"lora adapters: {sum(p.numel() for p in adapters):,} parameters" in printed
    assert "output: out (not created: --dry-run; " in printed and "free on its disk" in printed
    # bad input still fails as a real run would, before anything else
    assert main([*argv[:3], "0.99", *argv[4:]]) == 2 and "cannot be reached" in capsys.readouterr().err


def test_a_70b_plan_is_exact_from_the_config_alone(tmp_path):
    require_shared()
    folder = _config_folder(tmp_path, LLAMA_2_70B)
    plan = prune_plan(str(folder), PruneConfig(ratio=0.2, dtype="bfloat16"))
    assert plan.params == 68_976_648_192  # Llama-2-70B's published count
    assert plan.weight_bytes == 2 * plan.params and plan.pruned_bytes == 2 * plan.target <= 2 * 0.8 * plan.params
    # LoRA r=8 on every projection: r * (in + out) each, counted independently of peft
    h, kv, ffn, r = 8192, 1024, 28672, 8
    per_layer = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + ffn))
    assert plan.adapter_params == 80 * per_layer
    assert plan.adapter_bytes == 4 * 4 * plan.adapter_params  # fp32: weights, grads, two AdamW moments
    # 8 ranks: an eighth of every layer (all rows divide evenly) plus the embedding, norm and head whole
    outside = 2 * 32000 * h + h
    assert plan.shard_rank_bytes[8] == 2 * ((plan.params - outside) // 8 + outside)
    text = render_plan(plan)
    assert "80 layers, 8 KV groups of 8 query heads, MLP width 28672" in text and "128.48 GiB in bfloat16" in text


@pytest.mark.parametrize("method", ["flap", "dms"])
def test_the_plan_names_what_each_method_and_mode_trains(tmp_path, method):
    require_shared()
    config = PruneConfig(ratio=0.2, method=method)
    if method == "dms":
        config.search.mode = "structure"
    plan = prune_plan(str(STORIES), config)
    assert plan.adapter_params is None  # no adapters: a one-shot criterion, or frozen weights only
    assert ("mode" in plan.settings) == (method == "dms")
    assert torch.empty(()).element_size() * plan.params == plan.weight_bytes
