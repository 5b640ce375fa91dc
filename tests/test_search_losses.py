"""Search losses (task, kd, task+kd) with the model itself as the teacher, and every --method from the CLI."""

import json
import threading
import warnings

import pytest
import torch
from conftest import STORIES, TINYSTORIES, make_tiny, require_shared
from test_masks_slicing import randomize
from transformers import AutoModelForCausalLM

from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.cli import main
from dms_llm.config import METHODS, SearchConfig
from dms_llm.layer_scores import measure_layer_scores
from dms_llm.losses import SearchObjective, causal_lm_loss, teacher_targets
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


def _brute_force_layer_scores(model, masks, blocks, teacher, kd_weight, task_weight):
    """Each layer toggled under the hard masks, the search loss over all blocks in one batch."""
    masks.mode = "hard"
    masks.refresh()
    base_mask = masks.active["layers"][0]

    def loss_with(layer_mask):
        masks.active["layers"] = [layer_mask]
        with torch.no_grad():
            return float(causal_lm_loss(model, blocks, teacher, kd_weight, task_weight)[0])

    base, scores = loss_with(base_mask), []
    for layer in range(len(base_mask)):
        toggled = base_mask.clone()
        toggled[layer] = 1.0 - toggled[layer]
        change = loss_with(toggled) - base
        scores.append(change if base_mask[layer] > 0.5 else -change)  # a dropped layer: what restoring it gains
    masks.deactivate()
    return torch.tensor(scores, dtype=torch.float64)


def _threaded_reduce(world):
    """An in-process sum over ``world`` threads, standing in for the ranks' all-reduce."""
    barrier, slots = threading.Barrier(world), {}

    def for_rank(rank):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots[r] for r in range(world))
            barrier.wait()  # every rank has read the slots before any writes the next ones
            return total

        return reduce

    return for_rank


def test_layer_scores_and_the_layer_guard_measure_the_loss_the_search_minimises():
    blocks = torch.randint(0, 128, (6, 17), generator=torch.Generator().manual_seed(0))
    model = make_tiny("llama_gqa", layers=5)
    teacher = teacher_targets(model, blocks, topk=16)  # the dense model, coarsened as in a search
    masks = MaskSet(model)
    randomize(masks, seed=3)  # some layers dropped, pruned heads and channels
    assert 0 < len(masks.architecture().kept_layers) < 5  # kept and dropped layers both scored
    objective = SearchObjective(teacher, kd_weight=1.0, task_weight=0.5)
    # batches of 4: the second batch's blocks must meet their own rows of the teacher targets
    scores = measure_layer_scores(model, masks, blocks, batch_size=4, objective=objective).to(torch.float64)
    expected = _brute_force_layer_scores(model, masks, blocks, teacher, 1.0, 0.5)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    nll_scores = measure_layer_scores(model, masks, blocks, batch_size=4).to(torch.float64)
    nll_expected = _brute_force_layer_scores(model, masks, blocks, None, 0.0, 1.0)
    torch.testing.assert_close(nll_scores, nll_expected, atol=1e-5, rtol=1e-5)
    assert (scores - nll_scores).abs().max() > 1e-3  # the teacher term really counts
    # the guard's and head snapping's loss: the same objective, over batches
    with torch.no_grad():
        whole = float(causal_lm_loss(model, blocks, teacher, 1.0, 0.5)[0])
    assert objective.mean(model, blocks, batch_size=4) == pytest.approx(whole, rel=1e-6)
    # ranks splitting the blocks (a sharded search) score each block against its own teacher rows
    ranks = [make_tiny("llama_gqa", layers=5) for _ in range(2)]
    rank_masks = [MaskSet(m) for m in ranks]
    for rank_mask in rank_masks:
        randomize(rank_mask, seed=3)
    results, reduce_for = [None, None], _threaded_reduce(2)

    def run(rank):
        results[rank] = measure_layer_scores(ranks[rank], rank_masks[rank], blocks, None, rank, 2, reduce_for(rank),
                                             batch_size=2, split_data=True, objective=objective)  # fmt: skip

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        torch.testing.assert_close(result.to(torch.float64), expected, atol=1e-5, rtol=1e-5)
    masks.remove()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_end_to_end_from_the_cli(tmp_path, monkeypatch, capsys, method):
    require_shared()
    monkeypatch.chdir(tmp_path)
    argv = ["prune", str(STORIES), "--ratio", "0.3", "--calib", str(TINYSTORIES), "--method", method, "-o", "out",
            "--quiet", "search.steps=10", "data.num_blocks=64", "--recover", "lora", "--recover-data", str(TINYSTORIES),
            "--recover-steps", "2"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0, capsys.readouterr().err
    # the lora search's merged adapters leave nothing for recovery's peft to mistake for live ones
    noise = [str(w.message) for w in caught if "peft_config" in str(w.message) or "checkpointing" in str(w.message)]
    assert noise == []
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["search"]["method"] == method and report["settings"]["method"] == method
    assert report["params"]["after"] <= report["params"]["target"]
    assert report["perplexity"]["recovered"] > 0  # --recover applies to every method
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
