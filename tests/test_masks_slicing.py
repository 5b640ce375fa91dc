"""The core invariants: hard-masked logits == sliced logits, and the count == numel()."""

import copy

import pytest
import torch
from conftest import FAMILIES, make_tiny

from dms_llm.architecture import Architecture
from dms_llm.budget import ParamCounter
from dms_llm.errors import DMSError
from dms_llm.masks import MaskSet
from dms_llm.slicing import slice_model

TARGET_SETS = {
    "heads": ["heads"],
    "channels": ["channels"],
    "layers": ["layers"],
    "joint": ["heads", "channels", "layers"],
}


def randomize(masks: MaskSet, seed: int, layer_ratio: float = 0.6) -> None:
    """Random importances and keep ratios, as after some search steps."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for groups in masks.importance.values():
            for group in groups:
                group.copy_(torch.rand(group.shape, generator=generator))
        for kind, ratios in masks.keep_ratios.items():
            if kind == "layers":
                ratios.fill_(layer_ratio)
            else:
                ratios.copy_(0.15 + 0.8 * torch.rand(ratios.shape, generator=generator))


def check_masked_equals_sliced(
    model: torch.nn.Module, targets: list[str], seed: int, uniform: bool = False, ratios: dict | None = None
):
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    masks = MaskSet(model, targets=targets, uniform=uniform)
    counter = ParamCounter.from_model(model, masks.adapter)
    assert counter.total == sum(p.numel() for p in model.parameters())
    randomize(masks, seed)
    for kind, value in (ratios or {}).items():
        masks.keep_ratios[kind].data.fill_(value)
    masks.mode = "straight_through"
    masks.refresh()
    with torch.no_grad():
        masked = model(tokens).logits
    counted = masks.param_count(counter)
    arch = masks.architecture()
    masks.remove()
    slice_model(model, arch, layout="uniform" if uniform else "per_layer")
    with torch.no_grad():
        sliced = model(tokens).logits
    # fp32: atol 1e-5, or 1.5e-6 of the largest logit when that is larger. MKL's sgemm is not
    # invariant to a matrix's output width (x @ W[:8].T differs from (x @ W.T)[:, :8] by ~1e-6
    # relative), so a sliced k_proj differs from the masked one by a few ulp of the logit scale
    # (~20 for stories260K). In float64 the two agree to 1e-12: the math is identical.
    if masked.dtype == torch.float32:
        atol = max(1e-5, 1.5e-6 * masked.abs().max().item())
    else:
        atol = 1e-12
    torch.testing.assert_close(sliced, masked, atol=atol, rtol=0)
    numel = sum(p.numel() for p in model.parameters())
    assert counted.item() == numel  # exact, not approximately
    assert counter.count(arch) == numel
    return arch


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", list(TARGET_SETS))
def test_masked_logits_equal_sliced_logits_tiny(family, targets):
    model = make_tiny(family, seed=1)
    arch = check_masked_equals_sliced(model, TARGET_SETS[targets], seed=3)
    if "layers" in TARGET_SETS[targets]:
        assert len(arch.kept_layers) < arch.num_layers  # something was really dropped
    if targets == "heads":
        assert sum(arch.unit_counts()) < sum(arch.original_units)


@pytest.mark.parametrize("targets", list(TARGET_SETS))
def test_masked_logits_equal_sliced_logits_stories260k(stories, targets):
    model, _ = stories
    check_masked_equals_sliced(model, TARGET_SETS[targets], seed=5)


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_masked_equals_sliced_exactly_in_float64(family, stories):
    model = make_tiny(family, seed=4).double()
    check_masked_equals_sliced(model, ["heads", "channels", "layers"], seed=8)
    real, _ = stories
    check_masked_equals_sliced(real.double(), ["heads", "channels", "layers"], seed=5)


def test_uniform_layout_gives_a_stock_config(stories):
    model, _ = stories
    arch = check_masked_equals_sliced(
        model, ["heads", "channels", "layers"], seed=7, uniform=True, ratios={"heads": 0.5}
    )
    assert arch.is_uniform
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == arch.unit_counts()[0]
    assert model.config.num_attention_heads == 2 * arch.unit_counts()[0]
    assert model.config.intermediate_size == arch.channel_counts()[0]
    assert model.config.num_hidden_layers == len(arch.kept_layers)
    assert not hasattr(model.config, "dms_layer_shapes")


def test_uniform_head_counts_are_limited_to_what_the_stock_config_loads(stories):
    model, _ = stories
    # transformers 5's LlamaConfig needs hidden_size (64) divisible by the query heads (2 per unit)
    assert MaskSet(model, uniform=True).allowed_units == [1, 2, 4]
    arch = Architecture.dense([4] * 5, [172] * 5)
    three_units = Architecture(**{**arch.to_dict(), "kept_units": [[0, 1, 3]] * 5})
    with pytest.raises(DMSError, match="cannot be saved as a stock LlamaConfig"):
        slice_model(model, three_units, layout="uniform")
    slice_model(model, three_units, layout="per_layer")  # falls back to the per-layer format
    assert model.config.dms_layer_shapes[0] == {"num_key_value_heads": 3, "intermediate_size": 172}
    assert model.config.num_attention_heads == 8  # the valid base the modeling file resizes from


def test_removing_masks_restores_the_exact_original_model():
    model = make_tiny("llama_gqa")
    reference = copy.deepcopy(model.state_dict())
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(tokens).logits
    masks = MaskSet(model)
    randomize(masks, seed=2)
    masks.refresh()
    with torch.no_grad():
        during = model(tokens).logits
    assert not torch.allclose(during, before)
    masks.remove()
    with torch.no_grad():
        after = model(tokens).logits
    assert torch.equal(after, before)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name])
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_dropped_layers_are_renumbered_and_generation_works():
    model = make_tiny("qwen2", layers=5)
    masks = MaskSet(model, targets=["layers"])
    masks.importance["layers"][0].copy_(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]))
    masks.keep_ratios["layers"].data.fill_(0.6)
    arch = masks.architecture()
    masks.remove()
    assert arch.kept_layers == [0, 2, 4]
    slice_model(model, arch)
    layers = model.model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3 and len(model.config.layer_types) == 3
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_per_layer_slicing_records_shapes_and_switches_class():
    model = make_tiny("llama_gqa")
    arch = Architecture.dense([2] * 4, [96] * 4)
    arch = Architecture(
        **{
            **arch.to_dict(),
            "kept_units": [[0], [0, 1], [1], [0, 1]],
            "kept_channels": [list(range(10)), list(range(96)), list(range(50)), [3, 7]],
        }
    )
    slice_model(model, arch)
    assert type(model).__name__ == "DMSLlamaForCausalLM"
    assert model.config.dms_layer_shapes == [
        {"num_key_value_heads": 1, "intermediate_size": 10},
        {"num_key_value_heads": 2, "intermediate_size": 96},
        {"num_key_value_heads": 1, "intermediate_size": 50},
        {"num_key_value_heads": 2, "intermediate_size": 2},
    ]
    assert model.config.auto_map["AutoModelForCausalLM"].endswith("DMSLlamaForCausalLM")


def test_invalid_architectures_are_rejected():
    model = make_tiny("llama_gqa")
    arch = Architecture.dense([2] * 4, [96] * 4)
    with pytest.raises(DMSError, match="keeps no attention unit"):
        slice_model(model, Architecture(**{**arch.to_dict(), "kept_units": [[], [0], [0], [0]]}))
    with pytest.raises(DMSError, match="uniform"):
        slice_model(model, Architecture(**{**arch.to_dict(), "kept_units": [[0], [0, 1], [0], [0]]}), "uniform")
    with pytest.raises(DMSError, match="no decoder layer"):
        slice_model(model, Architecture(**{**arch.to_dict(), "kept_layers": []}))


def test_mask_gradients_update_importance_and_ratios():
    model = make_tiny("llama_gqa")
    model.requires_grad_(False)  # structure mode: frozen weights, gradients reach the masks only
    masks = MaskSet(model)
    tokens = torch.randint(0, 128, (2, 16))
    masks.refresh()
    model(tokens, labels=tokens).loss.backward()
    masks.update_importance(beta=0.0)
    for kind in ("heads", "channels"):
        assert all(group.abs().sum() > 0 for group in masks.importance[kind])
    # informed now: a ratio below 1 masks elements and the ratios receive gradient
    masks.keep_ratios["channels"].data.fill_(0.5)
    masks.refresh()
    model(tokens, labels=tokens).loss.backward()
    assert masks.keep_ratios["channels"].grad is not None
    assert masks.keep_ratios["channels"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
