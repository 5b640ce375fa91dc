"""The differentiable top-k operator of DMS (paper Sec. 3.1), as pure tensor functions.

Each row of ``importance`` is one group of N elements (the KV-group units of one layer, the MLP
channels of one layer, or the decoder layers of a model). A group has one learnable keep ratio
``e`` in [0, 1]. Elements are ranked by importance; the soft mask is a sigmoid of the distance
between an element's normalised rank and the prune ratio ``1 - e``:

    m_i = sigmoid(T * N * (c'_i - (1 - e)))

Ranks come from one ``argsort`` (O(N log N)), never an N x N comparison matrix. The rank is
centred in its bin, ``c'_i = (rank_i - 0.5) / N`` with rank 1 the least important, so that
``m_i >= 0.5`` holds for exactly the ``floor(e * N + 0.5)`` most important elements: the soft
mask and the hard top-k agree on which elements a keep ratio keeps.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    >>> keep = torch.tensor([0.5], requires_grad=True)
    >>> mask = topk_mask(scores, keep, temperature=1.0, mode="straight_through")
    >>> mask.tolist()
    [[0.0, 1.0, 1.0, 0.0]]
    >>> mask.sum().backward(); keep.grad.item() > 0
    True
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MaskMode = Literal["soft", "hard", "straight_through"]


def rank_positions(importance: Tensor) -> Tensor:
    """Rank of every element along the last dim: 1 for the least important, N for the most.

    Ties are broken by position (the earlier element ranks lower), so the result is
    deterministic. Cost: one stable argsort, O(N log N).
    """
    order = torch.argsort(importance, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, importance.shape[-1] + 1, device=importance.device)
    ranks.scatter_(-1, order, positions.expand_as(order).contiguous())
    return ranks.to(torch.float32)


def normalized_importance(importance: Tensor) -> Tensor:
    """Rank-normalised importance ``c' = (rank - 0.5) / N`` in (0, 1)."""
    n = importance.shape[-1]
    return (rank_positions(importance) - 0.5) / n


def keep_count(keep_ratio: Tensor, n: int, min_keep: int = 1) -> Tensor:
    """Number of elements a keep ratio keeps: ``floor(e * N + 0.5)``, clamped to [min_keep, N]."""
    count = torch.floor(keep_ratio.detach().to(torch.float64) * n + 0.5).to(torch.long)
    return count.clamp(min=min_keep, max=n)


def is_uninformed(importance: Tensor) -> Tensor:
    """True for groups whose importances are still all equal (nothing measured yet)."""
    return importance.amax(dim=-1) == importance.amin(dim=-1)


def hard_mask(importance: Tensor, count: Tensor) -> Tensor:
    """0/1 mask keeping exactly ``count`` most important elements of every row."""
    n = importance.shape[-1]
    ranks = rank_positions(importance)
    threshold = (n - count).to(ranks.dtype).unsqueeze(-1)
    mask = (ranks > threshold).to(torch.float32)
    return torch.where(is_uninformed(importance).unsqueeze(-1), torch.ones_like(mask), mask)


def soft_mask(importance: Tensor, keep_ratio: Tensor, temperature: float) -> Tensor:
    """Differentiable mask ``sigmoid(T * N * (c' - (1 - e)))``; all ones while uninformed."""
    n = importance.shape[-1]
    normalized = normalized_importance(importance)
    logits = temperature * n * (normalized - (1.0 - keep_ratio.to(torch.float32)).unsqueeze(-1))
    mask = torch.sigmoid(logits)
    return torch.where(is_uninformed(importance).unsqueeze(-1), torch.ones_like(mask), mask)


def topk_mask(
    importance: Tensor,
    keep_ratio: Tensor,
    temperature: float,
    mode: MaskMode = "straight_through",
    min_keep: int = 1,
) -> Tensor:
    """Mask for a batch of groups: rows of ``importance`` (G, N), keep ratios (G,).

    ``soft`` returns the sigmoid mask; ``hard`` the exact top-k (no gradient);
    ``straight_through`` the hard values in the forward pass with the soft mask's gradient.
    """
    if mode == "soft":
        return soft_mask(importance, keep_ratio, temperature)
    count = keep_count(keep_ratio, importance.shape[-1], min_keep)
    hard = hard_mask(importance, count)
    if mode == "hard":
        return hard
    if mode != "straight_through":
        raise ValueError(f"unknown mask mode {mode!r}; expected 'soft', 'hard' or 'straight_through'")
    soft = soft_mask(importance, keep_ratio, temperature)
    # (soft - soft.detach()) is exactly zero, so the forward value is exactly the hard mask
    return hard + (soft - soft.detach())


def straight_through_count(hard_count: Tensor, soft: Tensor) -> Tensor:
    """A count whose value is ``hard_count`` and whose gradient is that of ``soft.sum(-1)``."""
    soft_sum = soft.sum(dim=-1).to(torch.float64)
    return hard_count.to(torch.float64) + (soft_sum - soft_sum.detach())
