"""Keep ``x * mask`` products out of the autograd graph: saved as their factors, rebuilt in backward.

A mask hook hands ``o_proj``/``down_proj`` the product ``x * mask``. Multiplying saves ``x`` (the
mask's gradient needs it). In structure mode nothing else saves the product, since a frozen
projection's backward needs only its weight. But in lora mode each adapter's ``lora_A`` saves its
input for its weight gradient, and in joint mode the trained base weight does: that is a second
activation-sized tensor per masked projection. peft adds a third when it casts a bfloat16
product to the float32 adapters (the cast is the copy ``lora_A`` saves).

Inside :class:`RecomputedProducts` (``with``: the search's steps), a masked projection's own call
runs under a ``saved_tensors_hooks`` pair. A saved tensor that is the product, or a cast or
reshape of it found by walking its autograd history, is stored as its factors ``(x, mask)``,
which the multiplication keeps anyway. The backward rebuilds it with the same multiplication, so
the gradients are bit-identical. At the Llama-3.2-1B shape this removes ~40 MiB of the ~236 MiB
a lora-mode layer saves per 1024 tokens (the ``down_proj`` and ``o_proj`` inputs).

The hooks cover the projection's call only, not the whole forward. A pack hook that hands
autograd a tensor back makes a node that saves its own output (softmax, attention) hold itself
through C++, where Python's collector cannot see the cycle. A graph the backward never runs, such
as a dropped layer's block, which the masks cut off, would then never be freed. Inside a
projection, nothing saves its own output.

Example:
    >>> products = RecomputedProducts()
    >>> x, mask = torch.randn(4, 8), torch.rand(8, requires_grad=True)
    >>> weight = torch.randn(3, 8, requires_grad=True)
    >>> with products:
    ...     product = products.multiply(x, mask)           # a mask hook, before the projection
    ...     output = torch.nn.functional.linear(product, weight)
    ...     products.close()                               # after the projection
    >>> output.sum().backward(); products.packed
    1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DMSError

# autograd nodes that keep every element in place: a saved tensor reached through them is the
# product reshaped or cast, so the rebuilt product, cast and reshaped alike, equals it
_PASS_THROUGH = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ToCopyBackward0", "AliasBackward0"}
_MAX_HOPS = 4


@dataclass
class _Factors:
    """What a saved product is stored as until the backward asks for it."""

    x: Tensor
    mask: Tensor
    x_version: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def rebuild(self) -> Tensor:
        if self.x._version != self.x_version:
            raise DMSError(
                "a masked projection's input was modified in place between the forward and the backward; "
                "the search cannot rebuild what the backward needs (a model that writes into its activations "
                "in place is not supported by the search's memory saving)"
            )
        return (self.x * self.mask).to(device=self.device, dtype=self.dtype).reshape(self.shape)


class RecomputedProducts:
    """Saved-tensor hooks, open during one masked projection's call, that keep products as factors.

    ``with products:`` enables it (the search's steps); a mask hook's :meth:`multiply` then opens
    the hooks and the projection's forward hook :meth:`close` closes them. Only products whose
    mask requires a gradient count: then the multiplication itself saves ``x``, so holding it
    costs nothing.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._factors: dict[object, tuple[Tensor, Tensor, torch.Size]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self.packed = 0  # saved tensors stored as factors (what tests and benchmarks check)

    def __enter__(self) -> RecomputedProducts:
        self.enabled = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.enabled = False

    def multiply(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x * mask``; when enabled, the hooks open until :meth:`close` (after the projection)."""
        product = x * mask
        if self.enabled and product.grad_fn is not None and mask.requires_grad:
            self.close()  # a projection that raised before its forward hook: never nest
            self._factors[product.grad_fn] = (x, mask, product.shape)
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return product

    def close(self) -> None:
        """End the projection's call: later saves are ordinary again."""
        hooks, self._hooks = self._hooks, None
        self._factors.clear()
        if hooks is not None:
            hooks.__exit__(None, None, None)

    def _pack(self, tensor: Tensor) -> Tensor | _Factors:
        if not self._factors or tensor.grad_fn is None or not tensor.is_contiguous():
            return tensor
        node = tensor.grad_fn
        for _ in range(_MAX_HOPS):
            if node in self._factors:
                x, mask, shape = self._factors[node]
                if tensor.numel() != shape.numel():
                    return tensor
                self.packed += 1
                return _Factors(x, mask, x._version, tensor.shape, tensor.dtype, tensor.device)
            if node.name() not in _PASS_THROUGH or not node.next_functions:
                return tensor
            node = node.next_functions[0][0]
            if node is None:
                return tensor
        return tensor

    @staticmethod
    def _unpack(saved: Tensor | _Factors) -> Tensor:
        return saved.rebuild() if isinstance(saved, _Factors) else saved
