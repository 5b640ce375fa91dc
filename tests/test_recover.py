"""LoRA recovery: lower perplexity, clean merge, distillation, the recover command."""

import copy
import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES, require_shared
from test_cli import dms_llm

from dms_llm import PruneConfig, prune
from dms_llm.checkpoint import load_pruned, save_pruned
from dms_llm.config import RecoverConfig
from dms_llm.recover import attach_lora, distillation_loss, merge_lora, recover, recovery_data, train_lora

QUICK = {"data": {"num_blocks": 64}, "search": {"steps": 40}, "eval": {"heldout": False}}


def pruned_stories(stories, ratio=0.3):
    model, tokenizer = stories
    config = PruneConfig.from_dict({**QUICK, "ratio": ratio})
    config.data.calib = str(TINYSTORIES)
    return prune(model, tokenizer, config, progress=False)


def recover_config(**overrides) -> RecoverConfig:
    settings = {
        "method": "lora",
        "data": str(TINYSTORIES),
        "num_blocks": 256,
        "seq_len": 128,
        "steps": 60,
        "batch_size": 8,
        "lr": 3e-3,
        "heldout_fraction": 0.1,
        **overrides,
    }
    return RecoverConfig(**settings)


def test_recovery_lowers_heldout_perplexity(stories):
    require_shared()
    model, _ = pruned_stories(stories)
    params = sum(p.numel() for p in model.parameters())
    recovered, info = recover(model, stories[1], recover_config(), progress=False)
    assert info["heldout_after"] < 0.9 * info["heldout_before"], info
    assert sum(p.numel() for p in recovered.parameters()) == params  # merged: same size, no adapters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_gives_a_plain_model_with_the_unmerged_logits(stories, dtype):
    require_shared()
    model, report = pruned_stories(stories)
    model = model.to(dtype)
    model_class = type(model)
    config = recover_config(steps=5)
    data = recovery_data(stories[1], config)
    peft_model = attach_lora(model, config)
    train_lora(peft_model, data.calib, config, progress=False)
    tokens = data.heldout[:256].view(2, 128)
    with torch.no_grad():
        unmerged = peft_model(input_ids=tokens).logits
    merged = merge_lora(peft_model)
    with torch.no_grad():
        after = merged(input_ids=tokens).logits
    # float64: the merge is exact; float32: W + BA is rounded once more than x@W + x@A@B, a few ulp
    # of the logit scale (~20 here)
    scale = unmerged.abs().max().item()
    atol = 1e-10 if dtype == torch.float64 else 5e-6 * scale
    torch.testing.assert_close(after, unmerged, atol=atol, rtol=0)
    assert type(merged) is model_class
    assert not any("lora" in name for name in merged.state_dict())
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert report.params["after"] == sum(p.numel() for p in merged.parameters())


def test_distillation_loss_decreases_and_is_zero_for_identical_logits(stories):
    require_shared()
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = copy.deepcopy(stories[0])
    model, _ = pruned_stories(stories)
    config = recover_config(distill=True, steps=80)
    data = recovery_data(stories[1], config)
    peft_model = attach_lora(model, config)
    history = train_lora(peft_model, data.calib, config, teacher=teacher, progress=False)
    first = sum(h["kl"] for h in history[:10]) / 10
    last = sum(h["kl"] for h in history[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_distillation_without_a_teacher_is_refused(stories):
    require_shared()
    from dms_llm.errors import DMSError

    with pytest.raises(DMSError, match="needs the dense teacher"):
        recover(stories[0], stories[1], recover_config(distill=True), teacher=None)


@pytest.mark.slow
def test_recover_command_distils_from_the_model_named_in_the_report(tmp_path, stories):
    require_shared()
    model, report = pruned_stories(stories, ratio=0.2)
    report.model = str(STORIES)
    source = save_pruned(model, stories[1], tmp_path / "pruned", report=report.to_dict())
    out = tmp_path / "recovered"
    result = dms_llm(
        "recover",
        str(source),
        "--data",
        str(TINYSTORIES),
        "--steps",
        "30",
        "--seq-len",
        "128",
        "--lr",
        "3e-3",
        "--distill",
        "--output-dir",
        str(out),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out perplexity of the recovery data" in result.stdout
    saved = json.loads((out / "report.json").read_text())
    assert saved["recovery"]["distill"] is True and saved["recovery"]["steps"] == 30
    assert saved["params"] == report.params  # the pruning record is kept
    recovered = load_pruned(out)
    assert sum(p.numel() for p in recovered.parameters()) == report.params["after"]
    assert (out / "modeling_dms_pruned.py").exists() == (source / "modeling_dms_pruned.py").exists()
