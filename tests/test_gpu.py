"""CUDA / bf16 correctness; every test here is skipped on machines without a GPU (CI has none)."""

import pytest
import torch
from conftest import make_tiny

from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.config import SearchConfig
from dms_llm.masks import MaskSet
from dms_llm.search_loop import search
from dms_llm.slicing import slice_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_equals_sliced_on_cuda(dtype):
    model = make_tiny("llama_gqa").to("cuda", dtype)
    masks = MaskSet(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for groups in masks.importance.values():
            for group in groups:
                group.copy_(torch.rand(group.shape, generator=generator).cuda())
        masks.keep_ratios["heads"].fill_(0.5)
        masks.keep_ratios["channels"].fill_(0.6)
        masks.keep_ratios["layers"].fill_(0.75)
    masks.mode = "hard"
    masks.refresh()
    tokens = torch.randint(0, 128, (2, 32), device="cuda")
    with torch.no_grad():
        masked = model(tokens).logits.float()
    counter = ParamCounter.from_model(model, masks.adapter)
    counted = masks.param_count(counter).item()
    arch = masks.architecture()
    masks.remove()
    slice_model(model, arch)
    with torch.no_grad():
        sliced = model(tokens).logits.float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2 * masked.abs().max().item()
    torch.testing.assert_close(sliced, masked, atol=tolerance, rtol=0)
    assert counted == sum(p.numel() for p in model.parameters())
    assert all(p.is_cuda and p.dtype == dtype for p in model.parameters())


def test_bf16_search_with_gradient_checkpointing_lands_on_the_budget():
    model = make_tiny("llama_gqa", layers=6).to("cuda", torch.bfloat16)
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=0.3)
    blocks = torch.randint(0, 128, (32, 64))
    config = SearchConfig(
        mode="structure",
        steps=30,
        batch_size=4,
        gradient_checkpointing=True,
        layer_score_every=10,
        score_blocks=4,
        save_every=0,
    )
    result = search(model, masks, counter, budget, blocks, config, progress=False)
    assert budget.floor <= result.params <= budget.target
    assert all(isinstance(v, float) for v in masks.keep_ratios["channels"].tolist())
    assert masks.keep_ratios["channels"].dtype == torch.float32  # masks stay fp32 under bf16 weights


def test_free_bytes_of_a_gpu_count_what_this_process_already_holds():
    from dms_llm.sharding import device_free_bytes

    device = torch.device("cuda", torch.cuda.current_device())
    before = device_free_bytes(device)
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
    assert 0 < before <= torch.cuda.get_device_properties(device).total_memory
    assert device_free_bytes(device) == before - held.numel()
