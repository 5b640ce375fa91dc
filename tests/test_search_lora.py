"""search.mode=lora: adapters train with the keep ratios, then merge and slice to a plain model."""

import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES, make_tiny, require_shared
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.cli import main
from dms_llm.config import DataConfig, SearchConfig
from dms_llm.data import calibration_blocks
from dms_llm.evaluate import perplexity
from dms_llm.losses import teacher_targets
from dms_llm.masks import MaskSet
from dms_llm.search_adapters import merge_search_adapters
from dms_llm.search_loop import search
from dms_llm.slicing import slice_model

QUICK = dict(mode="lora", batch_size=4, layer_score_every=5, score_blocks=4, save_every=0)


def _lora_search(model, blocks, ratio=0.3, teacher=None, run=None, **settings):
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=ratio)
    config = SearchConfig(**{**QUICK, **settings})
    result = search(model, masks, counter, budget, blocks, config, progress=False, teacher=teacher,
                    keep_adapters=True, **(run or {}))  # fmt: skip
    assert budget.floor <= result.params <= budget.target
    return masks, result


def _masked_then_merged_and_sliced(model, masks, result, tokens):
    """Logits of the hard-masked model with its adapters, and of the merged, sliced model."""
    masks.mode = "hard"
    masks.refresh()
    with torch.no_grad():
        masked = model(tokens).logits
    masks.remove()
    assert merge_search_adapters(model) == 7 * model.config.num_hidden_layers
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not hasattr(model, "peft_config")  # a plain model: recovery's peft wraps it afresh
    slice_model(model, result.architecture)
    assert sum(p.numel() for p in model.parameters()) == result.params  # the count == numel()
    with torch.no_grad():
        return masked, model(tokens).logits


@pytest.mark.parametrize("family", ["llama_gqa", "llama_bias", "qwen2"])
def test_merged_and_sliced_model_equals_the_masked_model_with_its_adapters(family):
    model = make_tiny(family)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    masks, result = _lora_search(model, blocks, steps=20, lora_lr=1e-2)
    trained = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert len(trained) == 7 * model.config.num_hidden_layers
    assert all(p.abs().sum() > 0 for p in trained.values())  # B starts at zero: every adapter learned
    for name, parameter in model.named_parameters():  # the base weights stay frozen
        if "lora_" not in name:
            assert torch.equal(parameter, base[name.replace(".base_layer", "")]), name
    masked, sliced = _masked_then_merged_and_sliced(model, masks, result, blocks[:2])
    assert sliced.abs().max() < 5  # small logits: fp32 rounding stays far below the tolerance
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=0)


def test_distilled_lora_search_on_the_real_model_merges_exactly_in_float64(calib):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval().double()
    teacher = teacher_targets(model, calib.calib)  # the dense model: before masks and adapters
    masks, result = _lora_search(model, calib.calib, teacher=teacher, steps=30, loss="task+kd")
    assert all(p.dtype == torch.float64 for name, p in model.named_parameters() if "lora_" in name)
    tokens = calib.heldout[:256].view(2, 128)
    masked, sliced = _masked_then_merged_and_sliced(model, masks, result, tokens)
    # float64 removes the fp32 matmul-width rounding (~1e-6 of the logit scale): the math is identical
    torch.testing.assert_close(sliced, masked, atol=1e-9, rtol=0)


def test_lora_search_resumes_to_the_same_architecture_and_adapters(calib, tmp_path):
    settings = dict(steps=30, save_every=10, layer_score_every=10, score_blocks=8)

    def run(**kwargs):
        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        masks, result = _lora_search(model, calib.calib, run=kwargs, **settings)
        return result, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    expected, expected_adapters = run()

    def interrupt(step, record):
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(state_dir=tmp_path / "state", on_step=interrupt)
    resumed, resumed_adapters = run(state_dir=tmp_path / "state", resume=True)
    assert resumed.architecture == expected.architecture
    assert [h["task_loss"] for h in resumed.history] == [h["task_loss"] for h in expected.history]
    for name, value in expected_adapters.items():
        assert torch.equal(resumed_adapters[name], value), name


def test_the_default_cli_prune_runs_a_distilled_lora_search(tmp_path, monkeypatch, capsys):
    require_shared()
    monkeypatch.chdir(tmp_path)
    argv = ["prune", str(STORIES), "--ratio", "0.3", "--calib", str(TINYSTORIES), "-o", "out", "--quiet",
            "search.steps=20", "data.num_blocks=32"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # the "auto" defaults, made concrete in the report: adapters and distillation, on one process
    assert (report["settings"]["search"]["mode"], report["settings"]["search"]["loss"]) == ("lora", "task+kd")
    assert report["params"]["after"] <= report["params"]["target"]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in name for name in names)  # merged: a plain checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
    # the saved checkpoint is the model the report evaluated (merged adapters included)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    heldout = calibration_blocks(tokenizer, DataConfig(calib=str(TINYSTORIES), num_blocks=32), seed=0).heldout
    saved = perplexity(model.eval(), heldout, report["perplexity"]["seq_len"], 8)
    assert saved == pytest.approx(report["perplexity"]["pruned"], rel=1e-4)


def test_a_bfloat16_model_trains_float32_adapters_and_merges_back_to_bfloat16():
    model = make_tiny("llama_gqa").to(torch.bfloat16)
    blocks = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    masks, result = _lora_search(model, blocks, steps=6, layer_score_every=3)
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)  # Adam in bf16 loses small updates
    masks.remove()
    merge_search_adapters(model)
    slice_model(model, result.architecture)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == result.params


def test_lora_search_with_gradient_checkpointing_trains_the_same_adapters():
    """The 7B recipes checkpoint activations: the adapters and ratios must get the same gradients."""

    def run(checkpointing):
        model = make_tiny("llama_gqa")
        blocks = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
        _, result = _lora_search(model, blocks, steps=8, gradient_checkpointing=checkpointing)
        adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        return result, adapters

    plain, plain_adapters = run(False)
    checkpointed, checkpointed_adapters = run(True)
    assert checkpointed.architecture == plain.architecture
    assert [h["task_loss"] for h in checkpointed.history] == pytest.approx([h["task_loss"] for h in plain.history])
    assert plain_adapters.keys() == checkpointed_adapters.keys() and plain_adapters
    for name, value in plain_adapters.items():
        assert value.abs().sum() > 0 or "lora_A" in name
        torch.testing.assert_close(checkpointed_adapters[name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["structure", "lora"])
def test_a_dropped_layer_runs_no_backward_and_the_search_is_unchanged(calib, mode):
    """A layer whose mask is 0 passes its block no gradient: the search cuts the block's backward
    there. Everything it learns (ratios, importances, adapters, losses) must stay bit-identical."""
    require_shared()

    def run(skip):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        masks = MaskSet(model)
        masks.skip_dropped_backward = skip
        cut = []  # (step's dropped layers, whether their head masks got a gradient)
        collect = masks.collect_scores

        def spy(scale=1.0):
            dropped = sorted(masks._dropped)
            heads = masks.active.get("heads") if "heads" not in masks.frozen else None
            if dropped and heads is not None:
                cut.append((dropped, [heads[i].grad is None for i in dropped]))
            collect(scale)

        masks.collect_scores = spy
        counter = ParamCounter.from_model(model, masks.adapter)
        budget = resolve_budget(counter, ratio=0.5)
        config = SearchConfig(**{**QUICK, "mode": mode, "steps": 30, "layer_score_every": 10})
        result = search(model, masks, counter, budget, calib.calib, config, progress=False, keep_adapters=True)
        state = {**masks.state_dict(), **{n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}}
        return result, state, cut

    skipped, skipped_state, skipped_cut = run(True)
    full, full_state, full_cut = run(False)
    assert skipped_cut, "no layer was dropped while the search still learned: the test checks nothing"
    assert all(all(no_grad) for _, no_grad in skipped_cut)  # the dropped blocks ran no backward
    assert all(not any(no_grad) for _, no_grad in full_cut)  # the reference back-propagated zeros
    assert [d for d, _ in skipped_cut] == [d for d, _ in full_cut]
    assert skipped.architecture == full.architecture
    assert [h["task_loss"] for h in skipped.history] == [h["task_loss"] for h in full.history]
    assert skipped_state.keys() == full_state.keys()
    for name, value in full_state.items():
        assert torch.equal(skipped_state[name], value), name
