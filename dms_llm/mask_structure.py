"""Reading a structure out of DMS masks, and fixing one into them.

``MaskStructure`` is the part of ``MaskSet`` that turns learned keep ratios and importances into
an ``Architecture`` (what slicing keeps) and back: hard masks, the landing's ``wants`` table,
the architecture of given keep counts, and frozen masks. It lives apart from the hooks and the
importance bookkeeping so each file keeps one job; ``MaskSet`` is the only class that uses it.

Example:
    >>> masks = MaskSet(model)                                   # doctest: +SKIP
    >>> arch = masks.architecture(); counts = masks.counts(arch)  # doctest: +SKIP
    >>> masks.set_architecture(arch)   # every kind frozen to arch # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapters import LayerGeometry
from .architecture import Architecture
from .channel_groups import ChannelGroups
from .topk import MaskMode, hard_mask


class MaskStructure:
    """Architectures from (and into) a ``MaskSet``'s keep ratios, importances and frozen masks."""

    # set by MaskSet.__init__ (as is _group_mask, the mask of one group in the current mode)
    geometry: LayerGeometry
    targets: tuple[str, ...]
    temperatures: dict[str, float]
    mode: MaskMode
    channel_groups: ChannelGroups
    channel_multiple: int
    keep_ratios: dict[str, torch.nn.Parameter]
    importance: dict[str, list[Tensor]]
    frozen: dict[str, list[Tensor]]

    def hard_masks(self) -> dict[str, list[Tensor]]:
        """0/1 masks of every group as the hard top-k of the current state."""
        mode, self.mode = self.mode, "hard"
        try:
            with torch.no_grad():
                result = {}
                for kind in self.targets:
                    count = 1 if kind == "layers" else self.geometry.num_layers
                    result[kind] = [self._group_mask(kind, i)[0].detach() for i in range(count)]
                return result
        finally:
            self.mode = mode

    def architecture(self) -> Architecture:
        """The architecture the hard masks select (what slicing would keep)."""
        masks = self.hard_masks()
        arch = Architecture.dense(self.geometry.units, self.geometry.channels)

        def kept(mask: Tensor) -> list[int]:
            return torch.nonzero(mask > 0.5).flatten().tolist()

        return Architecture(
            num_layers=arch.num_layers,
            kept_layers=kept(masks["layers"][0]) if "layers" in masks else arch.kept_layers,
            kept_units=[kept(m) for m in masks["heads"]] if "heads" in masks else arch.kept_units,
            kept_channels=(
                [self.channel_groups.channels_of(i, kept(m)) for i, m in enumerate(masks["channels"])]
                if "channels" in masks
                else arch.kept_channels
            ),
            original_units=arch.original_units,
            original_channels=arch.original_channels,
        )

    def counts(self, arch: Architecture | None = None) -> dict[str, list[int]]:
        """Kept units/channels per original layer (of ``arch``, or of the current hard masks)."""
        arch = arch or self.architecture()
        return {"heads": [len(u) for u in arch.kept_units], "channels": [len(c) for c in arch.kept_channels]}

    def wants(self) -> dict[str, list[Tensor]]:
        """How strongly each layer's learned keep ratio wants its k-th most important element.

        ``wants[kind][layer][k - 1] = T * (e * N - k + 0.5)``: positive inside the learned keep
        set, negative outside; the soft mask's logit for that element (see ``topk``). Kinds
        that are not pruned want everything (``inf``). The landing (``refit``) reads this table.
        """
        tables: dict[str, list[Tensor]] = {}
        for kind in ("heads", "channels"):
            sizes = self.geometry.units if kind == "heads" else self.channel_groups.counts
            if kind not in self.keep_ratios:
                tables[kind] = [torch.full((n,), float("inf"), dtype=torch.float64) for n in sizes]
                continue
            ratios = self.keep_ratios[kind].detach().to("cpu", torch.float64).expand(len(sizes)).tolist()
            temperature = self.temperatures[kind]
            tables[kind] = [
                temperature * (ratio * n - torch.arange(1, n + 1, dtype=torch.float64) + 0.5)
                for ratio, n in zip(ratios, sizes)
            ]
        return tables

    def architecture_for(self, kept_layers: list[int], counts: dict[str, list[int]]) -> Architecture:
        """Keep the ``counts`` most important elements of every group, and ``kept_layers``."""
        base = Architecture.dense(self.geometry.units, self.geometry.channels)
        kept: dict[str, list[list[int]]] = {"heads": base.kept_units, "channels": base.kept_channels}
        for kind in ("heads", "channels"):
            if kind not in self.targets:
                continue
            rows = []
            per_element = self.channel_multiple if kind == "channels" else 1
            for layer, importance in enumerate(self.importance[kind]):
                wanted = counts[kind][layer] // per_element
                count = torch.tensor([wanted], device=importance.device)
                mask = hard_mask(importance.unsqueeze(0), count)[0]
                if bool(mask.all()) and wanted < len(importance):  # uninformed group
                    mask = (torch.arange(len(importance), device=importance.device) < count).float()
                chosen = torch.nonzero(mask > 0.5).flatten().tolist()
                rows.append(self.channel_groups.channels_of(layer, chosen) if kind == "channels" else chosen)
            kept[kind] = rows
        return Architecture(
            num_layers=base.num_layers,
            kept_layers=sorted(kept_layers),
            kept_units=kept["heads"],
            kept_channels=kept["channels"],
            original_units=base.original_units,
            original_channels=base.original_channels,
        )

    def set_keep_counts(self, counts: dict[str, list[int]]) -> None:
        """Set the keep ratios so the hard masks keep exactly ``counts`` (``e = k / N``)."""
        with torch.no_grad():
            for kind in ("heads", "channels"):
                if kind not in self.keep_ratios:
                    continue
                sizes = [len(imp) for imp in self.importance[kind]]
                ratios = self.keep_ratios[kind]
                per_element = self.channel_multiple if kind == "channels" else 1
                values = [counts[kind][i] // per_element / sizes[i] for i in range(len(sizes))]
                ratios.copy_(torch.tensor(values[: ratios.numel()], device=ratios.device))

    def freeze(self, kind: str, arch: Architecture | None = None) -> None:
        """Fix a kind's masks to hard 0/1 values (its keep ratios stop learning)."""
        if kind not in self.targets:
            return
        arch = arch or self.architecture()
        device = self.importance[kind][0].device
        if kind == "layers":
            mask = torch.zeros(self.geometry.num_layers, device=device)
            mask[arch.kept_layers] = 1.0
            self.frozen[kind] = [mask]
            return
        kept = arch.kept_units if kind == "heads" else arch.kept_channels
        if kind == "channels" and self.channel_multiple > 1:
            kept = [self.channel_groups.groups_of(i, keep) for i, keep in enumerate(kept)]
        masks = []
        for index, keep in enumerate(kept):
            mask = torch.zeros(len(self.importance[kind][index]), device=device)
            mask[keep] = 1.0
            masks.append(mask)
        self.frozen[kind] = masks

    def unfreeze(self, kind: str) -> None:
        self.frozen.pop(kind, None)

    def set_architecture(self, arch: Architecture) -> None:
        """Freeze every kind to ``arch`` (e.g. to evaluate or export a fixed structure)."""
        for kind in self.targets:
            self.freeze(kind, arch)
