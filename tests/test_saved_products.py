"""Masked projection inputs are saved for backward as their factors, with bit-identical gradients."""

import contextlib
import gc

import pytest
import torch
from conftest import make_tiny

from dms_llm.config import SearchConfig
from dms_llm.errors import DMSError
from dms_llm.losses import CausalLMLoss
from dms_llm.masks import MaskSet
from dms_llm.saved_products import RecomputedProducts
from dms_llm.search_adapters import attach_search_adapters


def _masked_model(mode: str, dtype: torch.dtype):
    model = make_tiny("llama_gqa").to(dtype)
    masks = MaskSet(model)
    model.requires_grad_(mode == "joint")
    if mode == "lora":
        adapters = attach_search_adapters(model, masks.adapter, SearchConfig(mode="lora"))
        masks.reattach()
        with torch.no_grad():  # B starts at zero, which would make every lora_A gradient zero
            for parameter in adapters:
                parameter.normal_(0.0, 0.1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # masks that really drop some heads and channels (not every layer)
        for kind in ("heads", "channels"):
            masks.keep_ratios[kind].fill_(0.6)
            for group in masks.importance[kind]:
                group.copy_(torch.rand(group.shape, generator=generator))
    return model, masks


def _gradients(model, masks, batch, saving: bool) -> dict[str, torch.Tensor]:
    masks.products.packed = 0
    masks.refresh()
    with masks.products if saving else contextlib.nullcontext():
        loss, _ = CausalLMLoss(model)(batch, None, 0.0, 1.0)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    grads.update({f"ratio.{kind}": ratio.grad for kind, ratio in masks.keep_ratios.items()})
    for kind, groups in masks.active.items():
        grads.update({f"mask.{kind}.{i}": mask.grad for i, mask in enumerate(groups)})
    model.zero_grad(set_to_none=True)
    for ratio in masks.keep_ratios.values():
        ratio.grad = None
    return grads


@pytest.mark.parametrize(
    "mode, dtype, saved_products",
    [
        ("lora", torch.float32, 2),  # lora_A of o_proj and down_proj would save the product
        ("lora", torch.bfloat16, 2),  # peft's float32 cast of the product would be saved
        ("joint", torch.float32, 2),  # the trained o_proj/down_proj weights would save it
        ("structure", torch.float32, 0),  # nothing saves it: nothing to do
    ],
)
def test_masked_inputs_are_kept_as_factors_and_gradients_stay_bit_identical(mode, dtype, saved_products):
    model, masks = _masked_model(mode, dtype)
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = _gradients(model, masks, batch, saving=False)
    assert masks.products.packed == 0
    saving = _gradients(model, masks, batch, saving=True)
    assert masks.products.packed == saved_products * model.config.num_hidden_layers
    assert plain.keys() == saving.keys() and len(plain) > 10
    for name, grad in plain.items():
        assert torch.equal(grad, saving[name]), name
    if mode != "structure":  # the gradients that read the rebuilt products are really there
        reading = [n for n in plain if ("o_proj" in n or "down_proj" in n) and n.endswith("weight")]
        assert reading and all(plain[n].abs().sum() > 0 for n in reading)


def test_an_input_changed_in_place_before_the_backward_is_refused():
    products = RecomputedProducts()
    x, mask = torch.randn(4, 8), torch.rand(8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    with products:
        loss = torch.nn.functional.linear(products.multiply(x, mask), weight).sum()
        products.close()
    assert products.packed == 1
    x.add_(1.0)  # the rebuilt product would differ from the one the forward used
    with pytest.raises(DMSError, match="modified in place"):
        loss.backward()


def test_outside_the_context_products_are_saved_as_usual():
    products = RecomputedProducts()
    x, mask = torch.randn(4, 8), torch.rand(8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    loss = torch.nn.functional.linear(products.multiply(x, mask), weight).sum()
    loss.backward()
    assert products.packed == 0 and weight.grad is not None


def _activations_alive(batch: torch.Tensor) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and o.dim() >= 2 and o.shape[:2] == batch.shape)


def test_a_dropped_layer_s_block_leaves_nothing_alive_after_the_step():
    """The masks cut a dropped layer's block off the graph, so no backward frees it: saved-tensor
    hooks around the whole forward would leak it through a C++ reference cycle, step after step."""
    model, masks = _masked_model("lora", torch.float32)
    with torch.no_grad():
        masks.keep_ratios["layers"].fill_(0.75)  # 3 of the 4 layers
        masks.importance["layers"][0].copy_(torch.tensor([4.0, 1.0, 3.0, 2.0]))
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _activations_alive(batch)
    for _ in range(2):
        masks.refresh()
        assert masks._dropped == {1}
        with masks.products:
            loss, _ = CausalLMLoss(model)(batch, None, 0.0, 1.0)
        loss.backward()
        del loss
        masks.deactivate()
    assert masks.products.packed > 0
    assert _activations_alive(batch) == before
