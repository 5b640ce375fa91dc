"""Per-layer pruned Llama-family models (written by dms-llm beside the weights).

This file is self-contained (torch + transformers only) so that a per-layer pruned checkpoint
loads with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` on a machine
without dms-llm. ``config.json`` keeps the family's own ``model_type`` and adds
``dms_layer_shapes``: one ``{"num_key_value_heads": k, "intermediate_size": n}`` per decoder
layer. The model is the family's stock class with each layer's projections resized, so the
forward pass, generation and KV cache are transformers' own code, in 5.x as in 4.x (from 4.38).

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("user/llama-pruned", trust_remote_code=True)  # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (linear.in_features, linear.out_features) == (in_features, out_features):
        return linear
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def apply_layer_shapes(model: nn.Module) -> None:
    """Resize every decoder layer's projections to the shapes recorded in the config."""
    config = model.config
    shapes = getattr(config, "dms_layer_shapes", None)
    if not shapes:
        return
    layers = model.model.layers
    if len(shapes) != len(layers):
        raise ValueError(f"dms_layer_shapes has {len(shapes)} entries but the model has {len(layers)} layers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group_size = config.num_attention_heads // config.num_key_value_heads
    hidden = config.hidden_size
    for layer, shape in zip(layers, shapes):
        kv_width = shape["num_key_value_heads"] * head_dim
        q_width = kv_width * group_size
        channels = shape["intermediate_size"]
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _resized(attn.q_proj, hidden, q_width)
        attn.k_proj = _resized(attn.k_proj, hidden, kv_width)
        attn.v_proj = _resized(attn.v_proj, hidden, kv_width)
        attn.o_proj = _resized(attn.o_proj, q_width, hidden)
        mlp.gate_proj = _resized(mlp.gate_proj, hidden, channels)
        mlp.up_proj = _resized(mlp.up_proj, hidden, channels)
        mlp.down_proj = _resized(mlp.down_proj, channels, hidden)
        # hidden_size: the attention's own width, by which transformers < 4.43 reshapes its output
        _set_counts(attn, num_heads=q_width // head_dim, num_key_value_heads=kv_width // head_dim, hidden_size=q_width)
        _set_counts(mlp, intermediate_size=channels)


def _set_counts(module: nn.Module, **counts: int) -> None:
    """Per-layer counts on the modules that keep them: transformers < 4.48 reshapes the attention by
    these attributes (later versions infer the counts from the tensors and have no such attributes)."""
    for name, value in counts.items():
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


class DMSLlamaForCausalLM(LlamaForCausalLM):
    """Llama with per-layer attention-unit and MLP-channel counts."""

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self)


class DMSMistralForCausalLM(MistralForCausalLM):
    """Mistral with per-layer attention-unit and MLP-channel counts."""

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self)


class DMSQwen2ForCausalLM(Qwen2ForCausalLM):
    """Qwen2 with per-layer attention-unit and MLP-channel counts."""

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self)


PRUNED_CLASSES = {
    "llama": DMSLlamaForCausalLM,
    "mistral": DMSMistralForCausalLM,
    "qwen2": DMSQwen2ForCausalLM,
}
