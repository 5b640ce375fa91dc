"""Chunked losses equal the full-logit computation; top-k distillation is the coarsened KL."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

import dms_llm.losses as losses
from dms_llm.losses import causal_lm_loss, teacher_targets


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks (5 positions each for a 128-token vocabulary)."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 128 * 5)


def test_chunked_loss_and_gradients_equal_the_full_logit_computation(small_chunks):
    model = make_tiny("llama_gqa").double().requires_grad_(True)
    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    loss, (ce, kl) = causal_lm_loss(model, tokens)
    loss.backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens).logits
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    full.backward()
    assert loss.item() == pytest.approx(full.item(), abs=1e-12) and ce.item() == pytest.approx(full.item(), abs=1e-12)
    assert kl.item() == 0.0
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(chunked[name], parameter.grad, atol=1e-12, rtol=0, msg=name)


def test_top_k_distillation_over_the_whole_vocabulary_is_the_full_kl(small_chunks):
    student = make_tiny("llama_gqa", seed=1).double()
    teacher = make_tiny("llama_gqa", seed=2).double()
    tokens = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    targets = teacher_targets(teacher, tokens, topk=128)
    _, (_, kl) = causal_lm_loss(student, tokens, targets, kd_weight=1.0)
    with torch.no_grad():
        s = F.log_softmax(student(tokens).logits[:, :-1], -1).flatten(0, 1)
        t = F.log_softmax(teacher(tokens).logits[:, :-1], -1).flatten(0, 1)
    full = F.kl_div(s, t, log_target=True, reduction="batchmean")
    # the targets are stored in fp32: the KL, a small difference of log-probabilities, to ~1e-5
    assert kl.item() == pytest.approx(full.item(), rel=1e-4)
    # fewer tokens: the KL of the coarsened distributions, never more than the full KL
    _, (_, coarse) = causal_lm_loss(student, tokens, teacher_targets(teacher, tokens, topk=8), kd_weight=1.0)
    assert 0.0 < coarse.item() <= full.item() + 1e-9


def test_kl_to_reference_is_the_mean_per_token_kl_over_blocks():
    from dms_llm.evaluate import kl_to_reference

    student = make_tiny("llama_gqa", seed=1).double()
    teacher = make_tiny("llama_gqa", seed=2).double()
    blocks = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(4))
    targets = teacher_targets(teacher, blocks, topk=128)
    with torch.no_grad():
        s = F.log_softmax(student(blocks).logits[:, :-1], -1).flatten(0, 1)
        t = F.log_softmax(teacher(blocks).logits[:, :-1], -1).flatten(0, 1)
    full = F.kl_div(s, t, log_target=True, reduction="batchmean").item()
    # batches of 2 over 5 blocks: the last batch is smaller, the mean is still per token
    assert kl_to_reference(student, targets, blocks, batch_size=2) == pytest.approx(full, rel=1e-4)
    assert kl_to_reference(teacher, targets, blocks) == pytest.approx(0.0, abs=1e-6)


def test_distillation_gradient_matches_autograd_of_the_same_loss(small_chunks):
    student = make_tiny("llama_gqa", seed=1).double().requires_grad_(True)
    teacher = make_tiny("llama_gqa", seed=2).double()
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    targets = teacher_targets(teacher, tokens, topk=128)
    loss, _ = causal_lm_loss(student, tokens, targets, kd_weight=0.5)
    loss.backward()
    chunked = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    logits = student(tokens).logits[:, :-1].flatten(0, 1)
    ce = F.cross_entropy(logits, tokens[:, 1:].flatten())
    t = targets.logprobs.flatten(0, 1).double().gather(-1, targets.indices.flatten(0, 1).long().argsort(-1))
    kl = F.kl_div(F.log_softmax(logits, -1), t, log_target=True, reduction="batchmean")
    (ce + 0.5 * kl).backward()
    # equal up to the fp32 storage of the teacher's log-probabilities (gradients are ~0.3 here)
    for name, parameter in student.named_parameters():
        torch.testing.assert_close(chunked[name], parameter.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_teacher_targets_are_the_dense_models_top_k():
    model = make_tiny("llama_mha")
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    targets = teacher_targets(model, tokens, topk=4)
    with torch.no_grad():
        expected = F.log_softmax(model(tokens).logits[:, :-1].float(), -1).topk(4, dim=-1)
    assert targets.indices.shape == (2, 8, 4) and targets.indices.dtype == torch.int32
    torch.testing.assert_close(targets.logprobs, expected.values, atol=1e-5, rtol=0)
    assert torch.equal(targets.select([1]).indices, targets.indices[1:2])


def test_a_biased_head_gets_the_same_loss_and_gradients(small_chunks):
    model = make_tiny("llama_gqa").double()
    head = torch.nn.Linear(64, 128, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0.0, 0.5)
    model.lm_head = head
    model.requires_grad_(True)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    loss, _ = causal_lm_loss(model, tokens)
    loss.backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(tokens).logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    full.backward()
    assert loss.item() == pytest.approx(full.item(), abs=1e-12)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(chunked[name], parameter.grad, atol=1e-12, rtol=0, msg=name)


def test_evaluating_a_trainable_model_takes_no_gradient(small_chunks, monkeypatch):
    """A model as loaded has trainable weights; its perplexity (under no_grad) must not take
    lm_head's gradient chunk by chunk (the chunked head's forward sees requires_grad there)."""
    from dms_llm.evaluate import perplexity

    model = make_tiny("llama_gqa").requires_grad_(True)
    tokens = torch.randint(0, 128, (4 * 17,), generator=torch.Generator().manual_seed(3))
    grads_taken = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads_taken.append(1) or real_grad(*a, **k))
    trainable = perplexity(model, tokens, seq_len=17)
    assert grads_taken == []
    frozen = perplexity(model.requires_grad_(False), tokens, seq_len=17)
    assert trainable == frozen
    # the spy sees the gradients a training loss takes, chunk by chunk
    causal_lm_loss(model.requires_grad_(True), tokens.view(4, 17))
    assert len(grads_taken) == 4 * 16 // 5 + 1
