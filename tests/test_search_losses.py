"""Search losses (task, kd, task+kd) with the model itself as the teacher, and every --method from the CLI."""

import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES, make_tiny, require_shared
from test_masks_slicing import randomize
from transformers import AutoModelForCausalLM

from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.cli import main
from dms_llm.config import METHODS, SearchConfig
from dms_llm.losses import causal_lm_loss, teacher_targets
from dms_llm.masks import MaskSet
from dms_llm.search_loop import search
from dms_llm.slicing import slice_model


def test_the_kd_teacher_is_the_same_model_with_its_masks_off():
    model = make_tiny("llama_gqa")
    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(tokens).logits
    dense = teacher_targets(model, tokens, topk=128)  # the whole vocabulary: nothing coarsened
    masks = MaskSet(model)
    randomize(masks, seed=1)  # as after some search steps
    masks.mode = "straight_through"
    masks.refresh()
    with torch.no_grad():
        masked_logits = model(tokens).logits
    student_kl = causal_lm_loss(model, tokens, dense, kd_weight=1.0, task_weight=0.0)[1][1]
    assert not torch.allclose(masked_logits, dense_logits, atol=1e-3)  # the masks really prune
    assert student_kl > 1e-3
    masks.deactivate()  # masks off: the teacher
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, dense_logits, atol=0, rtol=0)
    off = teacher_targets(model, tokens, topk=128)
    assert torch.equal(off.indices, dense.indices) and torch.equal(off.logprobs, dense.logprobs)
    self_kl = causal_lm_loss(model, tokens, dense, kd_weight=1.0, task_weight=0.0)[1][1]
    assert abs(float(self_kl)) < 1e-6  # KL of the dense model to itself
    masks.remove()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_teacher_pass_and_sum_to_the_one_process_targets(world):
    model = make_tiny("llama_gqa")
    blocks = torch.randint(0, 128, (11, 17), generator=torch.Generator().manual_seed(0))  # 3 batches of 4, one short
    alone = teacher_targets(model, blocks, topk=16, batch_size=4)
    forwards, parts = [], []
    hook = model.model.register_forward_hook(lambda *_: forwards.append(1))
    for rank in range(world):  # each rank on its own: reduce is the identity, the sum is done here
        forwards.clear()
        parts.append(teacher_targets(model, blocks, topk=16, batch_size=4, rank=rank, world=world, reduce=lambda t: t))
        assert len(forwards) == -(-3 // world)  # the same number of forwards on every rank (sharded layers)
    hook.remove()
    owned = [(part.indices != 0).flatten(1).any(1) for part in parts]
    assert sum(o.int() for o in owned).tolist() == [1] * 11  # every block computed by exactly one rank
    assert torch.equal(sum(p.indices for p in parts), alone.indices)
    assert torch.equal(sum(p.logprobs for p in parts), alone.logprobs)


@pytest.mark.parametrize("loss", ["kd", "task+kd"])
def test_a_distilled_search_lands_on_the_budget_and_slices_exactly(calib, loss):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    teacher = teacher_targets(model, calib.calib)  # before the masks: the dense model
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=0.3)
    config = SearchConfig(
        mode="structure", steps=30, batch_size=4, layer_score_every=10, score_blocks=8, save_every=0, loss=loss
    )
    result = search(model, masks, counter, budget, calib.calib, config, progress=False, teacher=teacher)
    assert budget.floor <= result.params <= budget.target
    masks.remove()
    slice_model(model, result.architecture)
    assert sum(p.numel() for p in model.parameters()) == result.params
    with pytest.raises(Exception, match="needs the dense model's targets"):
        search(model, MaskSet(model), counter, budget, calib.calib, config, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_end_to_end_from_the_cli(tmp_path, monkeypatch, capsys, method):
    require_shared()
    monkeypatch.chdir(tmp_path)
    argv = ["prune", str(STORIES), "--ratio", "0.3", "--calib", str(TINYSTORIES), "--method", method, "-o", "out",
            "--quiet", "search.steps=10", "data.num_blocks=64", "--recover", "lora", "--recover-data", str(TINYSTORIES),
            "--recover-steps", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["search"]["method"] == method and report["settings"]["method"] == method
    assert report["params"]["after"] <= report["params"]["target"]
    assert report["perplexity"]["recovered"] > 0  # --recover applies to every method
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
