"""The pruned architecture: which layers, attention units and MLP channels are kept.

This record is what a search produces and what slicing consumes; it is stored in
``report.json`` so a pruned model's structure can be reproduced from the dense checkpoint.

Example:
    >>> arch = Architecture.dense(units=[2, 2], channels=[4, 4])
    >>> arch.drop_layer(1).kept_layers
    [0]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Architecture:
    """Kept elements, indexed by the *original* layer numbers."""

    num_layers: int
    kept_layers: list[int]
    kept_units: list[list[int]]  # per original layer: kept KV-group (attention unit) indices
    kept_channels: list[list[int]]  # per original layer: kept MLP channel indices
    original_units: list[int] = field(default_factory=list)
    original_channels: list[int] = field(default_factory=list)

    @classmethod
    def dense(cls, units: list[int], channels: list[int]) -> Architecture:
        """The architecture that keeps everything."""
        return cls(
            num_layers=len(units),
            kept_layers=list(range(len(units))),
            kept_units=[list(range(u)) for u in units],
            kept_channels=[list(range(c)) for c in channels],
            original_units=list(units),
            original_channels=list(channels),
        )

    def drop_layer(self, layer: int) -> Architecture:
        return replace(self, kept_layers=[i for i in self.kept_layers if i != layer])

    def unit_counts(self) -> list[int]:
        """Kept attention units of each *kept* layer, in order."""
        return [len(self.kept_units[i]) for i in self.kept_layers]

    def channel_counts(self) -> list[int]:
        """Kept MLP channels of each *kept* layer, in order."""
        return [len(self.kept_channels[i]) for i in self.kept_layers]

    @property
    def is_uniform(self) -> bool:
        """True when every kept layer keeps the same number of units and of channels."""
        return len(set(self.unit_counts())) <= 1 and len(set(self.channel_counts())) <= 1

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "kept_layers": list(self.kept_layers),
            "kept_units": [list(u) for u in self.kept_units],
            "kept_channels": [list(c) for c in self.kept_channels],
            "original_units": list(self.original_units),
            "original_channels": list(self.original_channels),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Architecture:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
