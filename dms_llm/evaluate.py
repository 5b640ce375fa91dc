"""Perplexity of a causal LM on a token stream.

Protocol (as LLM-Pruner, SparseGPT and Wanda report it): the stream is cut into
non-overlapping windows of ``seq_len`` tokens (the remainder is dropped); each window is scored
on its own, predicting tokens 2..seq_len from the ones before; perplexity is
``exp(total NLL / predicted tokens)``. The stream starts with one BOS token.

Example:
    >>> tokens = tokenize_text(tokenizer, load_text("wiki.test.raw.txt"))   # doctest: +SKIP
    >>> perplexity(model, tokens, seq_len=128)                                # doctest: +SKIP
    12.62
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import split_blocks


def _device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def block_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over a batch of blocks."""
    total, count = 0.0, 0
    device = _device_of(model)
    batches = range(0, blocks.shape[0], batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total, count


def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL over blocks (log-perplexity)."""
    total, count = block_nll(model, blocks, batch_size)
    return total / max(count, 1)


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seq_len: int = 128, batch_size: int = 8, progress: bool = False
) -> float:
    """Perplexity over non-overlapping ``seq_len`` windows of a 1-D token stream."""
    blocks = split_blocks(tokens, seq_len)
    if blocks.shape[0] == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    was_training = model.training
    model.eval()
    try:
        total, count = block_nll(model, blocks, batch_size, progress)
    finally:
        model.train(was_training)
    return math.exp(total / count)
