"""Aligned MLP widths: M channels share one mask element, so every kept width is a multiple of M.

GPU kernels and llama.cpp's quantizers want widths in whole blocks (q8_0: 32, k-quants: 256). With
``channel_multiple = M`` the search ranks and keeps groups of M channels: a group's importance is
the sum of its channels' (the mask gradient of the shared element), its cost is M channels, and
the budget accounting stays exact. A layer of ``n`` channels has ``n // M`` groups; the
``n % M`` channels left over are never kept.

Which channels share a group is fixed before the search, by a weight-only proxy of importance,
``||down[:, c]|| * ||up[c, :]||``: channels of similar size share a group (so a group is not
kept for one strong channel among weak ones), and the left-over channels are the weakest.

Example:
    >>> groups = ChannelGroups.from_model(model, adapter, multiple=32)   # doctest: +SKIP
    >>> groups.channels_of(layer=0, kept_groups=[0, 3])                   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import DMSError


def _whole(tensor: Tensor) -> Tensor:
    """The full tensor of an FSDP shard (a DTensor), or the tensor itself."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


@dataclass
class ChannelGroups:
    multiple: int
    group_of: list[Tensor]  # per layer: (n,) group index of every channel; ``groups`` = left over
    members: list[Tensor]  # per layer: (groups, multiple) channel indices of every group

    @property
    def counts(self) -> list[int]:
        return [m.shape[0] for m in self.members]

    @classmethod
    def from_model(cls, model: nn.Module, adapter, multiple: int) -> ChannelGroups:
        group_of, members = [], []
        with torch.no_grad():
            for index, layer in enumerate(adapter.decoder_layers(model)):
                up, down = adapter.projection(layer, "up").weight, adapter.projection(layer, "down").weight
                channels = up.shape[0]
                if channels < multiple:
                    raise DMSError(
                        f"--channel-multiple {multiple} is larger than layer {index}'s MLP width ({channels})"
                    )
                if multiple == 1:
                    order = torch.arange(channels)
                else:
                    proxy = _whole(down).float().norm(dim=0).cpu() * _whole(up).float().norm(dim=1).cpu()
                    order = torch.argsort(proxy, descending=True, stable=True)
                groups = channels // multiple
                assignment = torch.full((channels,), groups, dtype=torch.long)
                assignment[order[: groups * multiple]] = torch.arange(groups).repeat_interleave(multiple)
                group_of.append(assignment)
                members.append(torch.sort(order[: groups * multiple].view(groups, multiple), dim=1).values)
        return cls(multiple, group_of, members)

    def expand(self, layer: int, mask: Tensor) -> Tensor:
        """A channel mask from a group mask (left-over channels 0), differentiable in ``mask``."""
        padded = torch.cat([mask, mask.new_zeros(1)])
        return padded[self.group_of[layer].to(mask.device)]

    def channels_of(self, layer: int, kept_groups: list[int]) -> list[int]:
        """Sorted channel indices of the kept groups."""
        if not kept_groups:
            return []
        return sorted(self.members[layer][kept_groups].flatten().tolist())

    def groups_of(self, layer: int, kept_channels: list[int]) -> list[int]:
        """The groups whose channels are kept (an architecture from ``channels_of``)."""
        assignment = self.group_of[layer][kept_channels]
        return sorted({int(g) for g in assignment if int(g) < self.counts[layer]})
