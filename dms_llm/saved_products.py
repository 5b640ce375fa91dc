"""Keep ``x * mask`` products out of the autograd graph: saved as their factors, rebuilt in backward.

A mask hook hands ``o_proj``/``down_proj`` the product ``x * mask``. Multiplying saves ``x`` (the
mask's gradient needs it). In structure mode nothing else saves the product, since a frozen
projection's backward needs only its weight. But in lora mode each adapter's ``lora_A`` saves its
input for its weight gradient, and in joint mode the trained base weight does: that is a second
activation-sized tensor per masked projection. peft adds a third when it casts a bfloat16
product to the float32 adapters (the cast is the copy ``lora_A`` saves).

Inside :class:`RecomputedProducts`, a saved tensor that is a registered product is stored as
``(x, mask)`` instead. ``x`` and the mask are already saved by the multiplication. The product
is rebuilt when the backward needs it: the same multiplication with the same operands, so bit for
bit the same tensor. That includes casts and reshapes, found by walking the tensor's autograd
history back to the product. At the Llama-3.2-1B shape this removes ~40 MiB of the ~236 MiB a
lora-mode layer saves per 1024 tokens (the ``down_proj`` and ``o_proj`` inputs).

Example:
    >>> products = RecomputedProducts()
    >>> x, mask = torch.randn(4, 8), torch.rand(8, requires_grad=True)
    >>> weight = torch.randn(3, 8, requires_grad=True)
    >>> with products:
    ...     product = products.multiply(x, mask)
    ...     loss = torch.nn.functional.linear(product, weight).sum()
    >>> loss.backward(); products.packed
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
    """A ``saved_tensors_hooks`` pair that stores registered ``x * mask`` products as their factors.

    Only products whose mask requires a gradient are registered: then the multiplication itself
    saves ``x``, so holding it costs nothing. The registry lives for one forward (``with``) and
    holds the products' autograd nodes, which the graph holds anyway until the backward.
    """

    def __init__(self) -> None:
        self._factors: dict[object, tuple[Tensor, Tensor, torch.Size]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self.packed = 0  # saved tensors stored as factors (what tests and benchmarks check)

    def multiply(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x * mask``, registered so that a later save of it (or of a cast or view) keeps factors."""
        product = x * mask
        if self._hooks is not None and product.grad_fn is not None and mask.requires_grad:
            self._factors[product.grad_fn] = (x, mask, product.shape)
        return product

    def __enter__(self) -> RecomputedProducts:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        self._factors.clear()  # the forward is over: nothing saves a product any more
        hooks.__exit__(*exc)

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
