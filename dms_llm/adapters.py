"""Family adapters: where the prunable modules of each supported architecture live.

An adapter is data, keyed by ``config.model_type`` (as peft keys its target modules): the path
to the decoder layers and the names of the attention and MLP projections. Everything else
(head geometry, per-layer sizes) is read off the modules themselves, so a model that was already
pruned to per-layer shapes is handled the same way as a dense one.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96,
    ...     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=32))
    >>> geometry = get_adapter(model.config).geometry(model)
    >>> geometry.units, geometry.group_size, geometry.channels
    ([2, 2], 4, [96, 96])
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import DMSError, did_you_mean


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes of the prunable dimensions of a model, per decoder layer."""

    head_dim: int
    group_size: int  # query heads per KV head: one attention unit = 1 KV head + its queries
    units: list[int]  # KV heads (attention units) per layer
    channels: list[int]  # MLP intermediate channels per layer

    @property
    def num_layers(self) -> int:
        return len(self.units)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.units)) <= 1 and len(set(self.channels)) <= 1


@dataclass(frozen=True)
class FamilyAdapter:
    """Module names of one model family."""

    model_type: str
    layers_path: str = "model.layers"
    final_norm: str = "model.norm"  # applied to the last decoder layer's output, before lm_head
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # config attributes holding one entry per decoder layer; sliced when layers are removed
    per_layer_config_lists: tuple[str, ...] = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def attention_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def mlp_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def projection(self, layer: nn.Module, name: str) -> nn.Linear:
        """One projection of a decoder layer by role: q, k, v, o, gate, up or down."""
        parent = self.mlp_of(layer) if name in ("gate", "up", "down") else self.attention_of(layer)
        return getattr(parent, getattr(self, f"{name}_proj"))

    def set_projection(self, layer: nn.Module, name: str, linear: nn.Linear) -> None:
        parent = self.mlp_of(layer) if name in ("gate", "up", "down") else self.attention_of(layer)
        setattr(parent, getattr(self, f"{name}_proj"), linear)

    def geometry(self, model: nn.Module) -> LayerGeometry:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        group_size = config.num_attention_heads // config.num_key_value_heads
        units, channels = [], []
        for layer in self.decoder_layers(model):
            units.append(self.projection(layer, "k").out_features // head_dim)
            channels.append(self.projection(layer, "gate").out_features)
        return LayerGeometry(head_dim, group_size, units, channels)


ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama"),
    "mistral": FamilyAdapter("mistral"),
    "qwen2": FamilyAdapter("qwen2", per_layer_config_lists=("layer_types",)),
}


def get_adapter(config) -> FamilyAdapter:
    """The adapter for a transformers config, or a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise DMSError(
            f"model type {model_type!r} is not supported by dms-llm (it prunes Llama-family decoders)."
            + did_you_mean(str(model_type), ADAPTERS)
        )
    return ADAPTERS[model_type]
