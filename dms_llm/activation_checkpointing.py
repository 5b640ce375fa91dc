"""Activation (gradient) checkpointing on or off, under the name this transformers gives it.

transformers 5 renamed ``gradient_checkpointing_enable``/``_disable`` to
``activation_checkpointing_enable``/``_disable`` and warns on every call of the old names; the
early 5.x releases have only the old ones. Checkpointing is always non-reentrant here: the masks'
hooks and LoRA adapters need their gradients through recomputed blocks.

Example:
    >>> set_activation_checkpointing(model, True)    # doctest: +SKIP
    >>> set_activation_checkpointing(model, False)   # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each decoder layer's activations in the backward (``enabled``), or stop doing so."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
