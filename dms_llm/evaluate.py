"""Perplexity of a causal LM on a token stream, and its divergence from a reference model.

Protocol (as LLM-Pruner, SparseGPT and Wanda report it): the stream is cut into
non-overlapping windows of ``seq_len`` tokens (the remainder is dropped); each window is scored
on its own, predicting tokens 2..seq_len from the ones before; perplexity is
``exp(total NLL / predicted tokens)``. The stream starts with one BOS token.

Example:
    >>> tokens = tokenize_text(tokenizer, load_text("wiki.test.raw.txt"))   # doctest: +SKIP
    >>> perplexity(model, tokens, seq_len=128)                                # doctest: +SKIP
    12.62
    >>> dense = teacher_targets(base_model, blocks, topk=vocab_size)          # doctest: +SKIP
    >>> kl_to_reference(pruned_model, dense, blocks)                          # doctest: +SKIP
    0.96
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import EvalConfig
from .data import NAMED_SOURCES, load_text, split_blocks, tokenize_text
from .losses import TeacherTargets, causal_lm_loss, summed_nll


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
        total += summed_nll(model, batch)  # in sequence chunks: no full-vocabulary logits
        count += batch[:, 1:].numel()
    return total, count


def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL over blocks (log-perplexity)."""
    total, count = block_nll(model, blocks, batch_size)
    return total / max(count, 1)


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 128,
    batch_size: int = 8,
    progress: bool = False,
    max_windows: int | None = None,
) -> float:
    """Perplexity over non-overlapping ``seq_len`` windows of a 1-D token stream."""
    blocks = split_blocks(tokens, seq_len)[:max_windows]
    if blocks.shape[0] == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    was_training = model.training
    model.eval()
    try:
        total, count = block_nll(model, blocks, batch_size, progress)
    finally:
        model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def kl_to_reference(model: nn.Module, reference: TeacherTargets, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token KL(reference || model) in nats over ``blocks``, where ``reference`` holds
    another model's log-probabilities on the same blocks (``teacher_targets``).

    Exact when the targets keep the whole vocabulary; with top-k targets it is the KL of the
    distributions coarsened to those k tokens plus one "rest" bucket (a lower bound). Unlike
    perplexity on text far from a small model's training data, which rewards flat predictions,
    this measures how faithfully a pruned model keeps the base model's predictions there.
    """
    if reference.temperature != 1.0:
        raise ValueError("kl_to_reference needs targets at temperature 1.0")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, blocks.shape[0], batch_size):
            rows = list(range(start, min(start + batch_size, blocks.shape[0])))
            batch = blocks[rows].to(_device_of(model))
            _, parts = causal_lm_loss(model, batch, reference.select(rows), kd_weight=1.0, task_weight=0.0)
            tokens = batch[:, 1:].numel()
            total += float(parts[1]) * tokens
            count += tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)


def prepare_perplexity_sources(tokenizer, sources: list[str]) -> dict[str, tuple[torch.Tensor, int | None]]:
    """label -> (token stream, window limit) for named sources (test splits) and text files."""
    prepared = {}
    for source in sources:
        named = NAMED_SOURCES.get(source) if not Path(source).expanduser().exists() else None
        text = load_text(source, split="test", max_rows=named.eval_rows if named else None)
        label = source if named else Path(source).stem
        prepared[label] = (tokenize_text(tokenizer, text), named.eval_windows if named else None)
    return prepared


def evaluate_model(
    model: nn.Module,
    tokenizer,
    config: EvalConfig,
    sources: dict[str, tuple[torch.Tensor, int | None]] | None = None,
    progress: bool = False,
) -> dict:
    """Perplexities (``sources``, prepared once and reused) and lm-eval zero-shot results."""
    sources = sources if sources is not None else prepare_perplexity_sources(tokenizer, config.ppl)
    result: dict = {"params": sum(p.numel() for p in model.parameters()), "seq_len": config.seq_len}
    result["perplexity"] = {
        label: perplexity(model, tokens, config.seq_len, config.batch_size, progress, max_windows)
        for label, (tokens, max_windows) in sources.items()
    }
    if config.tasks:
        from .zeroshot import zero_shot

        result["zero_shot"] = zero_shot(
            model,
            tokenizer,
            config.tasks,
            limit=config.limit,
            batch_size=config.batch_size,
            task_data=config.task_data,
        )
    return result


def render_evaluation(columns: dict[str, dict], width: int = 100) -> str:
    """Side-by-side table (e.g. dense vs pruned) of perplexities and zero-shot accuracies."""
    from rich.console import Console
    from rich.table import Table

    names = list(columns)
    table = Table(title="evaluation")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    first = columns[names[0]]
    table.add_row("parameters", *[f"{columns[n]['params']:,}" for n in names])
    for label in first.get("perplexity", {}):
        values = [columns[n]["perplexity"].get(label) for n in names]
        table.add_row(f"ppl {label} (seq {first['seq_len']})", *[f"{v:.3f}" if v else "-" for v in values])
    tasks = (first.get("zero_shot") or {}).get("tasks", {})
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if metric in tasks[task]:
                values = [columns[n]["zero_shot"]["tasks"][task].get(metric) for n in names]
                table.add_row(f"{task} {metric}", *[f"{100 * v:.2f}" if v is not None else "-" for v in values])
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    if tasks:
        zero_shot = first["zero_shot"]
        limit = f", limit {zero_shot['limit']}" if zero_shot.get("limit") else ""
        buffer.write(f"lm-eval {zero_shot['lm_eval_version']} ({zero_shot['source']}{limit}); accuracies in %\n")
    return buffer.getvalue()
