"""LoRA recovery: lower perplexity, clean merge, distillation, the recover command."""

import gc
import json
import warnings

import pytest
import torch
from conftest import STORIES, TINYSTORIES, require_shared
from peft import PeftModel
from safetensors.torch import load_file
from test_cli import dms_llm
from transformers import AutoModelForCausalLM, PreTrainedModel

import dms_llm.recover as recover_module
from dms_llm import PruneConfig, prune
from dms_llm.checkpoint import load_pruned, save_pruned
from dms_llm.cli import main
from dms_llm.config import RecoverConfig
from dms_llm.losses import TeacherTargets, causal_lm_loss, teacher_targets
from dms_llm.recover import attach_lora, merge_lora, recover, recovery_data, recovery_teacher, train_lora

QUICK = {"data": {"num_blocks": 64}, "search": {"steps": 40}, "eval": {"heldout": False}}


def pruned_stories(stories, ratio=0.3):
    # a pruned model to recover: the quickest search (structure mode: no adapters, no teacher pass)
    model, tokenizer = stories
    config = PruneConfig.from_dict({**QUICK, "ratio": ratio, "search": {"steps": 40, "mode": "structure"}})
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


def _recover_a_copy(model, tokenizer, config, data):
    """Recover a fresh copy of ``model`` (seed 5); returns (the recovered model, one trained weight)."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    recovered, _ = recover(fresh.eval(), tokenizer, config, seed=5, progress=False, data=data)
    return recovered, recovered.model.layers[0].mlp.down_proj.weight.clone()


def test_recovery_depends_on_its_seed_only(stories):
    # the adapters' init once drew from whatever global RNG state came before: two recoveries with
    # the same seed differed from run to run (and in the quality benchmark, from row to row)
    require_shared()
    model, tokenizer = stories
    config = recover_config(steps=3, num_blocks=32)
    data = recovery_data(tokenizer, config)
    weights = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # unrelated randomness before the call
        weights.append(_recover_a_copy(model, tokenizer, config, data)[1])
    assert torch.equal(weights[0], weights[1])


def test_recovery_with_activation_checkpointing_trains_the_same_weights(stories):
    # non-reentrant recomputation is exact; and no deprecated transformers call (a FutureWarning each run)
    require_shared()
    model, tokenizer = stories
    data = recovery_data(tokenizer, recover_config(steps=3, num_blocks=32))
    weights = []
    for checkpointing in (False, True):
        config = recover_config(steps=3, num_blocks=32, gradient_checkpointing=checkpointing)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            recovered, weight = _recover_a_copy(model, tokenizer, config, data)
        weights.append(weight)
    name = "is_activation_checkpointing" if hasattr(type(recovered), "is_activation_checkpointing") else ""
    assert not getattr(recovered, name or "is_gradient_checkpointing")  # switched off again after training
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=0)
    assert not torch.equal(weights[0], model.model.layers[0].mlp.down_proj.weight)  # it did train


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


def test_distillation_from_top_k_targets_lowers_the_kl(stories):
    require_shared()
    dense, tokenizer = stories
    config = recover_config(distill=True, steps=80)
    data = recovery_data(tokenizer, config)
    targets = teacher_targets(dense, data.calib[:16], topk=config.distill_topk)
    _, parts = causal_lm_loss(dense, data.calib[:16], targets, kd_weight=1.0)
    assert parts[1].item() == pytest.approx(0.0, abs=1e-5)  # the dense model is its own teacher
    data, targets = recovery_teacher(dense, tokenizer, config)  # before pruning: the dense model's view
    model, _ = pruned_stories(stories)
    peft_model = attach_lora(model, config)
    history = train_lora(peft_model, data.calib, config, teacher=targets, progress=False)
    first = sum(h["kl"] for h in history[:10]) / 10
    last = sum(h["kl"] for h in history[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def _live(kind):
    return [o for o in gc.get_objects() if isinstance(o, kind)]


def test_prune_with_distilled_recovery_holds_no_second_model(stories, monkeypatch):
    """The teacher of --recover lora --distill is top-k targets, not a second set of weights."""
    require_shared()
    import dms_llm.recover as recover_module

    # what other tests left alive is not this run's doing: hold it (so no address is reused) and skip it
    before_models, before_tensors = _live(PreTrainedModel), _live(torch.Tensor)
    before = {t.untyped_storage().data_ptr() for t in before_tensors}
    seen = {}
    train = recover_module.train_lora

    def spy(peft_model, blocks, config, teacher=None, *args, **kwargs):
        student = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
        others = {}  # every other float matrix made by this run: a teacher copy would show up here
        for tensor in _live(torch.Tensor):
            if not (tensor.is_floating_point() and tensor.dim() >= 2) or tensor is teacher.logprobs:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in student | before:
                others[storage.data_ptr()] = storage.nbytes()
        own = {id(m) for m in peft_model.get_base_model().modules()}  # the student and its inner decoder
        known = {id(m) for m in before_models}
        models = [o for o in _live(PreTrainedModel) if id(o) not in own | known]
        seen.update(teacher=teacher, other_bytes=sum(others.values()), models=models)
        return train(peft_model, blocks, config, teacher, *args, **kwargs)

    monkeypatch.setattr(recover_module, "train_lora", spy)
    model, tokenizer = stories
    dense_bytes = sum(p.nbytes for p in model.parameters())
    config = PruneConfig.from_dict({**QUICK, "ratio": 0.3})
    config.data.calib = str(TINYSTORIES)
    config.recover = recover_config(distill=True, steps=3)
    prune(model, tokenizer, config, progress=False)
    # the teacher is data: top-k log-probabilities per recovery token, whatever the model's size
    assert isinstance(seen["teacher"], TeacherTargets)
    assert tuple(seen["teacher"].indices.shape) == (256, 127, config.recover.distill_topk)
    assert seen["other_bytes"] < 0.25 * dense_bytes, seen  # no dense copy (it would be >= 100%)
    assert seen["models"] == []  # the student is the only model alive while it trains


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
    # --quiet: no progress bars (transformers' "Writing model shards" included) and no library warnings
    assert result.stderr.strip() == "", result.stderr[-2000:]
    saved = json.loads((out / "report.json").read_text())
    assert saved["recovery"]["distill"] is True and saved["recovery"]["steps"] == 30
    assert saved["params"] == report.params  # the pruning record is kept
    recovered = load_pruned(out)
    assert sum(p.numel() for p in recovered.parameters()) == report.params["after"]
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # carried through prune and recover
        assert (out / name).read_bytes() == (STORIES / name).read_bytes(), name
    assert (out / "modeling_dms_pruned.py").exists() == (source / "modeling_dms_pruned.py").exists()


def test_an_interrupted_recovery_resumes_to_the_same_model(tmp_path, monkeypatch, capsys):
    require_shared()
    monkeypatch.chdir(tmp_path)
    args = ["recover", str(STORIES), "--data", str(TINYSTORIES), "--steps", "6", "--save-every", "2", "--quiet",
            "--distill", "--teacher", str(STORIES)]  # fmt: skip
    assert main([*args, "-o", "whole"]) == 0
    capsys.readouterr()

    calls, real_loss = [], recover_module.causal_lm_loss

    def interrupted_at_step_5(*a, **k):  # Ctrl-C after the step-4 checkpoint was written
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(recover_module, "causal_lm_loss", interrupted_at_step_5)
    assert main([*args, "-o", "cut"]) == 130
    assert "--resume continues from the last checkpoint in cut-checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "cut").exists()
    assert sorted(p.name for p in (tmp_path / "cut-checkpoints").iterdir()) == ["step-2", "step-4"]
    monkeypatch.setattr(recover_module, "causal_lm_loss", real_loss)

    # a checkpoint is a plain peft adapter too
    base = AutoModelForCausalLM.from_pretrained(STORIES)
    adapted = PeftModel.from_pretrained(base, tmp_path / "cut-checkpoints" / "step-4")
    assert any("lora_A" in name for name, _ in adapted.named_parameters())

    assert main([*args, "-o", "cut", "--resume", "--lr", "1e-3"]) == 2  # other settings: refused, by name
    assert "different settings (lr)" in capsys.readouterr().err
    assert main([*args, "-o", "elsewhere", "--resume"]) == 2
    assert "'elsewhere-checkpoints' holds no adapter checkpoint to continue from" in capsys.readouterr().err

    assert main([*args, "-o", "cut", "--resume"]) == 0  # steps 4 and 5, from step-4's state
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    history = json.loads((tmp_path / "cut" / "report.json").read_text())["recovery"]["history"]
    assert [record["step"] for record in history] == list(range(6))
    assert history == json.loads((tmp_path / "whole" / "report.json").read_text())["recovery"]["history"]
