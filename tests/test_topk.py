"""The differentiable top-k operator on its own."""

import math

import pytest
import torch

from dms_llm.topk import (
    hard_mask,
    keep_count,
    normalized_importance,
    rank_positions,
    soft_mask,
    straight_through_count,
    topk_mask,
)


def naive_ranks(scores: torch.Tensor) -> torch.Tensor:
    """The reference code's N x N comparison, ties broken by position (for checking only)."""
    n = scores.numel()
    ranks = torch.zeros(n)
    for i in range(n):
        below = (scores < scores[i]).sum() + ((scores == scores[i]) & (torch.arange(n) < i)).sum()
        ranks[i] = below + 1
    return ranks


def test_ranks_match_pairwise_definition_with_ties():
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.1, 0.5])
    assert rank_positions(scores).tolist() == naive_ranks(scores).tolist()
    random = torch.randint(0, 5, (40,)).float()
    assert torch.equal(rank_positions(random), naive_ranks(random))


def test_normalized_importance_is_in_open_unit_interval():
    values = normalized_importance(torch.rand(3, 50))
    assert values.min() > 0 and values.max() < 1
    assert torch.allclose(values.sort(dim=-1).values[0], (torch.arange(1, 51) - 0.5) / 50)


def test_rank_is_n_log_n_on_a_llama_sized_group():
    # an N x N comparison of 32 layers x 11008 channels would need ~15 GB; argsort needs ~3 MB
    scores = torch.rand(32, 11008)
    ranks = rank_positions(scores)
    assert ranks.shape == scores.shape
    assert torch.equal(ranks.sort(dim=-1).values[0], torch.arange(1, 11009, dtype=torch.float32))


@pytest.mark.parametrize("n", [1, 4, 7, 172, 1000])
def test_hard_mask_keeps_round_e_times_n(n):
    scores = torch.rand(1, n)
    for e in torch.linspace(0.0, 1.0, 23):
        count = keep_count(e.reshape(1), n)
        expected = min(max(math.floor(float(e) * n + 0.5), 1), n)
        assert int(count) == expected
        mask = hard_mask(scores, count)
        assert int(mask.sum()) == expected
        # the kept ones are the most important ones
        if expected < n:
            assert scores[mask.bool()].min() > scores[~mask.bool()].max()


def test_soft_mask_agrees_with_hard_mask_on_which_elements_are_kept():
    scores = torch.rand(5, 64)
    ratios = torch.tensor([0.11, 0.37, 0.5, 0.73, 0.96])
    soft = soft_mask(scores, ratios, temperature=1.0)
    hard = hard_mask(scores, keep_count(ratios, 64))
    assert torch.equal((soft >= 0.5).float(), hard)


def test_uninformed_groups_keep_everything_and_do_not_move_the_ratio():
    scores = torch.zeros(2, 10)
    ratio = torch.tensor([0.3, 0.6], requires_grad=True)
    mask = topk_mask(scores, ratio, temperature=1.0)
    assert torch.equal(mask, torch.ones(2, 10))
    mask.sum().backward()
    assert torch.equal(ratio.grad, torch.zeros(2))


@pytest.mark.parametrize("mode", ["soft", "straight_through"])
def test_gradient_reaches_the_keep_ratio_with_the_right_sign(mode):
    scores = torch.rand(3, 32)
    ratio = torch.tensor([0.3, 0.5, 0.8], requires_grad=True)
    topk_mask(scores, ratio, temperature=1.0, mode=mode).sum().backward()
    assert (ratio.grad > 0).all()  # keeping more raises the kept amount


def test_straight_through_values_are_exactly_hard():
    scores = torch.rand(4, 33)
    ratio = torch.tensor([0.2, 0.45, 0.6, 0.99], requires_grad=True)
    mask = topk_mask(scores, ratio, temperature=4.0, mode="straight_through")
    hard = hard_mask(scores, keep_count(ratio, 33))
    assert torch.equal(mask.detach(), hard)
    count = straight_through_count(hard.sum(-1), soft_mask(scores, ratio, 4.0))
    assert torch.equal(count.detach(), hard.sum(-1).double())
    count.sum().backward()
    assert (ratio.grad > 0).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown mask mode"):
        topk_mask(torch.rand(1, 4), torch.tensor([0.5]), 1.0, mode="fuzzy")
