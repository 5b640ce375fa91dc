"""Next-token losses without full-vocabulary logits, and a teacher that is not a second model.

``causal_lm_loss`` runs the decoder once and applies ``lm_head`` to chunks of positions: at most
``CHUNK_ELEMENTS`` fp32 logits exist at a time (Llama-3's 128,256-token vocabulary at 8 x 2048
tokens would be 8.4 GB of fp32 logits, more with their gradient). The gradient of each chunk is
taken as soon as it is computed (``_ChunkedHead``), so the backward pass neither stores nor
recomputes logits.

Distillation uses the teacher's top-k log-probabilities, computed once by ``teacher_targets``
from the dense model before it is pruned (or before the pruned model is loaded): no teacher
weights are held while training. The loss is the exact KL divergence between the teacher's and
the student's distributions coarsened to the teacher's top-k tokens plus one bucket for the rest.

Example:
    >>> targets = teacher_targets(model, blocks, topk=64)               # doctest: +SKIP
    >>> loss, parts = causal_lm_loss(student, blocks[:8], targets.select(range(8)), kd_weight=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ELEMENTS = 2**24  # fp32 logits per chunk: 64 MiB (130 positions of a 128K vocab, 512 of a 32K one)


def _upcast(logits: Tensor) -> Tensor:
    """Logits in at least fp32 (bf16/fp16 heads are upcast; a float64 model stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) under a causal-LM head."""
    return getattr(model, model.base_model_prefix)


def chunk_positions(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _ChunkedHead(torch.autograd.Function):
    """Summed per-token loss of ``hidden @ weight.T``, chunk by chunk, gradients taken in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_fn, chunk, parts, *targets):
        inputs = (hidden, weight, bias)
        needs = [ctx.needs_input_grad[i] and inputs[i] is not None for i in range(3)]
        grads = [torch.zeros_like(t) if need else None for t, need in zip(inputs, needs)]
        total = torch.zeros((), dtype=_upcast(hidden[:0]).dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            leaves = [
                t.detach().requires_grad_(need) if t is not None else None
                for t, need in zip((hidden[start:stop], weight, bias), needs)
            ]
            with torch.enable_grad():
                logits = _upcast(F.linear(*leaves))
                loss, chunk_parts = loss_fn(logits, *(t[start:stop] for t in targets))
            if any(needs):
                found = iter(torch.autograd.grad(loss, [t for t, need in zip(leaves, needs) if need]))
                for index, need in enumerate(needs):
                    if need and index == 0:
                        grads[0][start:stop] = next(found)
                    elif need:
                        grads[index] += next(found)
            total += loss.detach()
            parts += chunk_parts
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.present = [g is not None for g in grads]
        ctx.untracked = 3 + len(targets)  # loss_fn, chunk, parts and the targets get no gradient
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [g if present else None for g, present in zip(ctx.saved_tensors, ctx.present)]
        scaled = [g * grad_output.to(g.dtype) if g is not None else None for g in grads]
        return (*scaled, *([None] * ctx.untracked))


def chunked_head_loss(
    hidden: Tensor, head: nn.Linear, loss_fn: Callable, targets: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """(sum over positions of ``loss_fn(logits_chunk, *targets_chunk)``, the sums of its extras)."""
    chunk = chunk_positions(head.weight.shape[0])
    # with --device-map the last layer and lm_head may sit on different GPUs: follow the head
    device = head.weight.device
    hidden, targets = hidden.to(device), [t.to(device) for t in targets]
    parts = torch.zeros(2, dtype=_upcast(hidden[:0]).dtype, device=device)
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():
        # a Function's forward sees requires_grad even under no_grad: without this, evaluating a
        # trainable model (as loaded) took lm_head's weight gradient in every chunk (at Llama-3's
        # 128K vocabulary: +3 GiB and twice the head's time per perplexity batch at 1B)
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _ChunkedHead.apply(hidden, weight, bias, loss_fn, chunk, parts, *targets), parts


@dataclass
class TeacherTargets:
    """The dense model's top-k next-token log-probabilities for every position of some blocks."""

    indices: Tensor  # (blocks, seq_len - 1, k) int32
    logprobs: Tensor  # (blocks, seq_len - 1, k) float32, at ``temperature``
    temperature: float = 1.0

    def select(self, rows: Tensor | Sequence[int]) -> TeacherTargets:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return TeacherTargets(self.indices[rows], self.logprobs[rows], self.temperature)

    @property
    def nbytes(self) -> int:
        return self.indices.nbytes + self.logprobs.nbytes


def _losses(kd_weight: float, temperature: float, task_weight: float) -> Callable:
    """Per-chunk ``task_weight * CE + kd_weight * T^2 * KL``; extras: (CE sum, KL sum)."""

    def loss_fn(logits: Tensor, labels: Tensor, *teacher: Tensor) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(logits, labels, reduction="sum")
        if not teacher:
            return task_weight * ce, torch.stack([ce.detach(), ce.new_zeros(())])
        indices, teacher_logp = teacher
        student = F.log_softmax(logits / temperature, dim=-1)
        student_top = student.gather(-1, indices.long())
        teacher_p = teacher_logp.exp()
        # the rest of the vocabulary as one bucket: the KL of the coarsened distributions is exact
        teacher_rest = (1.0 - teacher_p.sum(-1)).clamp_min(1e-12)
        student_rest = (1.0 - student_top.exp().sum(-1)).clamp_min(1e-12)
        kl = (teacher_p * (teacher_logp - student_top)).sum() + (
            teacher_rest * (teacher_rest.log() - student_rest.log())
        ).sum()
        kl = kl * temperature**2
        return task_weight * ce + kd_weight * kl, torch.stack([ce.detach(), kl.detach()])

    return loss_fn


def _summed_loss_of_hidden(
    model: nn.Module,
    hidden: Tensor,
    input_ids: Tensor,
    teacher: TeacherTargets | None,
    kd_weight: float,
    task_weight: float,
) -> tuple[Tensor, Tensor]:
    """(summed loss, summed (CE, KL)) from the final hidden states (B, T, H) of ``input_ids``;
    ``teacher`` holds the targets of exactly these blocks."""
    positions = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    targets: list[Tensor] = [labels]
    temperature = 1.0
    if teacher is not None and kd_weight > 0:
        targets += [teacher.indices.reshape(labels.numel(), -1), teacher.logprobs.reshape(labels.numel(), -1)]
        temperature = teacher.temperature
    loss_fn = _losses(kd_weight, temperature, task_weight)
    return chunked_head_loss(positions, model.get_output_embeddings(), loss_fn, targets)


@dataclass(frozen=True)
class SearchObjective:
    """The loss a search minimises, ``task_weight * CE + kd_weight * KL``, for the search's discrete
    decisions (layer scores, the layer guard, head snapping) to measure as well: a layer is then
    kept for what it does to the dense model's predictions, not only to the calibration text's NLL.

    ``teacher`` holds the dense model's targets for the blocks the decisions are measured on; a
    batch names its ``rows`` in them. Without a teacher (or ``kd_weight`` 0) it is the plain NLL.

    Example:
        >>> objective = SearchObjective(teacher_targets(model, blocks), kd_weight=1.0)   # doctest: +SKIP
        >>> loss = objective.summed_of_hidden(model, hidden, blocks[:8], rows=range(8))  # doctest: +SKIP
    """

    teacher: TeacherTargets | None = None
    kd_weight: float = 0.0
    task_weight: float = 1.0

    @property
    def distils(self) -> bool:
        return self.teacher is not None and self.kd_weight > 0

    def summed_of_hidden(
        self, model: nn.Module, hidden: Tensor, input_ids: Tensor, rows: Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """Summed loss over the predicted positions, from the final (normed) hidden states (B, T, H)."""
        if not self.distils:  # the plain NLL
            return _summed_loss_of_hidden(model, hidden, input_ids, None, 0.0, 1.0)[0]
        if rows is None:
            raise ValueError("a distilling objective needs the rows of the teacher targets")
        part = self.teacher.select(rows)
        return _summed_loss_of_hidden(model, hidden, input_ids, part, self.kd_weight, self.task_weight)[0]

    @torch.no_grad()
    def mean(self, model: nn.Module, blocks: Tensor, batch_size: int = 8) -> float:
        """Mean per-predicted-token loss of ``model`` on ``blocks`` (rows 0..N-1 of the teacher)."""
        device = model.get_input_embeddings().weight.device
        total, count = 0.0, 0
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            hidden = decoder_of(model)(input_ids=batch, use_cache=False).last_hidden_state
            rows = range(start, start + batch.shape[0])
            total += float(self.summed_of_hidden(model, hidden, batch, rows))
            count += batch[:, 1:].numel()
        return total / max(count, 1)


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    teacher: TeacherTargets | None = None,
    kd_weight: float = 0.0,
    task_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(mean loss, per-token means of (CE, KL)) of next-token prediction on ``input_ids`` (B, T)."""
    hidden = decoder_of(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    total, parts = _summed_loss_of_hidden(model, hidden, input_ids, teacher, kd_weight, task_weight)
    count = input_ids[:, 1:].numel()
    return total / count, parts / count


class CausalLMLoss(nn.Module):
    """A causal LM whose forward returns the chunked loss: the module DDP/FSDP wrap in a search."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(
        self, input_ids: Tensor, teacher: TeacherTargets | None = None, kd_weight: float = 0.0, task_weight: float = 1.0
    ):
        return causal_lm_loss(self.lm, input_ids, teacher, kd_weight, task_weight)


@torch.no_grad()
def teacher_targets(
    model: nn.Module,
    blocks: Tensor,
    topk: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> TeacherTargets:
    """Top-k log-probabilities of ``model`` (run it dense: masks off) at every position of ``blocks``.

    With ``world`` > 1 data-parallel ranks, rank ``r`` computes the batches ``r, r + world, ...``
    (each the same batch one process would run, so the values are the same) and ``reduce`` (a sum
    over ranks) fills in the rest: every rank ends with all targets for 1/world of the forwards.
    Every rank runs the same number of forwards (a sharded model's layers are collective).
    """
    device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings()
    k = min(topk, head.weight.shape[0])
    rows, positions = blocks.shape[0], blocks.shape[1] - 1
    # zeros where another rank fills in: the sum over ranks is then exact
    indices = torch.zeros(rows, positions, k, dtype=torch.int32)
    logprobs = torch.zeros(rows, positions, k, dtype=torch.float32)
    chunk = chunk_positions(head.weight.shape[0])
    starts = list(range(0, rows, batch_size))
    rounds = -(-len(starts) // world)  # forwards per rank, the same on every rank
    was_training = model.training
    model.eval()
    try:
        for turn in range(rounds):
            position = turn * world + rank
            start = starts[min(position, len(starts) - 1)]  # past the end: repeat the last batch, unused
            batch = blocks[start : start + batch_size].to(device)
            hidden = decoder_of(model)(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
            if position >= len(starts):
                continue
            flat = hidden.reshape(-1, hidden.shape[-1])
            top_values, top_indices = [], []
            for first in range(0, flat.shape[0], chunk):
                logp = F.log_softmax(_upcast(head(flat[first : first + chunk])) / temperature, dim=-1)
                values, index = logp.topk(k, dim=-1)
                top_values.append(values.cpu())
                top_indices.append(index.to(torch.int32).cpu())
            shape = (batch.shape[0], positions, k)
            logprobs[start : start + batch.shape[0]] = torch.cat(top_values).view(shape)
            indices[start : start + batch.shape[0]] = torch.cat(top_indices).view(shape)
    finally:
        model.train(was_training)
    if world > 1:
        if reduce is None:
            raise ValueError("teacher_targets over several ranks needs reduce (a sum over the ranks)")
        for first in range(0, rows, batch_size * 16):  # bounded transfers: a few hundred MB at most
            part = slice(first, first + batch_size * 16)
            logprobs[part] = reduce(logprobs[part].to(device)).cpu()
            indices[part] = reduce(indices[part].to(device)).cpu()
    return TeacherTargets(indices, logprobs, temperature)


@torch.no_grad()
def summed_nll(model: nn.Module, blocks: Tensor) -> float:
    """Summed next-token NLL of a batch of blocks (no logits beyond one chunk)."""
    total, _ = causal_lm_loss(model, blocks)
    return float(total) * blocks[:, 1:].numel()
