"""Attach DMS masks to a transformers model with hooks, and remove them again.

The forward pass stays transformers' own code. Hooks multiply:
- the input of every ``o_proj`` by the layer's attention-unit mask (a unit = one KV head and
  its query heads, so each kept layer stays a valid GQA attention module),
- the input of every ``down_proj`` by the layer's MLP-channel mask,
- the outputs of every attention and MLP block by the layer mask, so a masked layer computes
  ``h + d * attn(norm(h))`` and ``h + d * mlp(norm(h))``.
Removing the hooks gives back the exact original model (no weight is touched).

Example:
    >>> masks = MaskSet(model)                 # doctest: +SKIP
    >>> masks.refresh(); loss = model(**batch).loss; loss.backward()   # doctest: +SKIP
    >>> masks.update_importance(); arch = masks.architecture()         # doctest: +SKIP
    >>> masks.remove()                                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .adapters import FamilyAdapter, get_adapter
from .channel_groups import ChannelGroups
from .errors import DMSError
from .mask_structure import MaskStructure
from .saved_products import RecomputedProducts
from .topk import MaskMode, hard_mask, keep_count, soft_mask, straight_through_count

TARGETS = ("heads", "channels", "layers")


class MaskSet(MaskStructure):
    """Learnable keep ratios, importance scores and hooks for one model.

    Groups: ``heads`` (per layer, over attention units), ``channels`` (per layer, over MLP
    channels) and ``layers`` (one group over the decoder layers). With ``uniform=True`` the
    per-layer groups of a kind share one keep ratio, so every layer keeps the same count.
    Reading an architecture out of the masks (and freezing one into them) is ``MaskStructure``'s.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[str] = TARGETS,
        uniform: bool = False,
        temperatures: dict[str, float] | None = None,
        adapter: FamilyAdapter | None = None,
        channel_multiple: int = 1,
    ) -> None:
        unknown = set(targets) - set(TARGETS)
        if unknown or not targets:
            raise DMSError(f"prune targets must be a non-empty subset of {', '.join(TARGETS)}; got {list(targets)}")
        self.model = model
        self.adapter = adapter or get_adapter(model.config)
        self.geometry = self.adapter.geometry(model)
        if uniform and not self.geometry.is_uniform:
            raise DMSError("--layout uniform needs a model whose layers all have the same shape")
        self.targets = tuple(t for t in TARGETS if t in targets)
        self.uniform = uniform
        self.temperatures = {"heads": 4.0, "channels": 1.0, "layers": 4.0, **(temperatures or {})}
        self.mode: MaskMode = "straight_through"
        device = next(model.parameters()).device
        num_layers = self.geometry.num_layers
        # the channel mask elements are groups of ``channel_multiple`` channels (see channel_groups)
        self.channel_groups = ChannelGroups.from_model(model, self.adapter, channel_multiple)
        self.channel_multiple = channel_multiple
        sizes = {"heads": self.geometry.units, "channels": self.channel_groups.counts, "layers": [num_layers]}
        self.keep_ratios: dict[str, nn.Parameter] = {}
        self.importance: dict[str, list[Tensor]] = {}
        for kind in self.targets:
            groups = 1 if (uniform or kind == "layers") else num_layers
            self.keep_ratios[kind] = nn.Parameter(torch.ones(groups, device=device))
            self.importance[kind] = [torch.zeros(n, device=device) for n in sizes[kind]]
        # uniform layout: head counts the family's stock config can be saved with
        self.allowed_units: list[int] | None = None
        if uniform and "heads" in self.targets:
            from .slicing import stock_unit_counts

            self.allowed_units = stock_unit_counts(model.config, self.geometry)
        self.frozen: dict[str, list[Tensor]] = {}
        self.active: dict[str, list[Tensor]] | None = None
        self._counts: dict[str, Tensor] = {}
        self._pending: dict[tuple[str, int], Tensor] = {}  # squared mask gradients not yet averaged in
        # layers whose mask is 0 at the last refresh: their blocks get no backward (see _output_hook)
        self.skip_dropped_backward = True
        self._dropped: set[int] = set()
        self._handles: list = []
        # inside ``with masks.products`` no masked projection input is saved twice (saved_products)
        self.products = RecomputedProducts()
        self._attach()

    # ---- hooks -------------------------------------------------------------------------
    def _attach(self) -> None:
        unit_width = self.geometry.group_size * self.geometry.head_dim
        for index, layer in enumerate(self.adapter.decoder_layers(self.model)):
            masked = []
            if "heads" in self.targets:
                o_proj = self.adapter.projection(layer, "o")
                self._handles.append(o_proj.register_forward_pre_hook(self._input_hook("heads", index, unit_width)))
                masked.append(o_proj)
            if "channels" in self.targets:
                down = self.adapter.projection(layer, "down")
                self._handles.append(down.register_forward_pre_hook(self._input_hook("channels", index, 1)))
                masked.append(down)
            for projection in masked:  # the saved-tensor hooks the input hook may open end with the call
                close = lambda *_: self.products.close()  # noqa: E731
                self._handles.append(projection.register_forward_hook(close, always_call=True))
            if "layers" in self.targets:
                for block in (self.adapter.attention_of(layer), self.adapter.mlp_of(layer)):
                    self._handles.append(block.register_forward_hook(self._output_hook(index)))

    def _input_hook(self, kind: str, index: int, width: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self.active is None:
                return None
            x = args[0]
            scale = self.active[kind][index].to(device=x.device, dtype=x.dtype)
            if width > 1:
                scale = scale.repeat_interleave(width)
            elif kind == "channels" and self.channel_multiple > 1:
                scale = self.channel_groups.expand(index, scale)
            return (self.products.multiply(x, scale), *args[1:])

        return hook

    def _output_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output):
            if self.active is None:
                return None
            first = output[0] if isinstance(output, tuple) else output
            if self.skip_dropped_backward and index in self._dropped:
                # the layer's mask is 0 in the forward, so every gradient into the block is exactly
                # zero: cut it there, so the backward skips the block (only the mask's own gradient,
                # sum(grad * output), is needed) and the block's saved activations are freed now.
                # (Layer scoring swaps the layer mask after its refresh, but without gradients.)
                first = first.detach()
            scaled = first * self.active["layers"][0][index].to(device=first.device, dtype=first.dtype)
            return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

        return hook

    def remove(self) -> None:
        """Detach every hook: the model is exactly the original again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = None

    def reattach(self) -> None:
        """Hook the model's current projections again, after something replaced them (LoRA
        wrappers put in or merged away): the masks must scale what the new modules receive."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attach()

    # ---- masks -------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The learnable keep ratios (what the search optimises)."""
        return list(self.keep_ratios.values())

    def ratio(self, kind: str, index: int) -> Tensor:
        ratios = self.keep_ratios[kind]
        return ratios[0] if ratios.numel() == 1 else ratios[index]

    def min_keep_ratio(self, kind: str) -> Tensor:
        """Per-group lower bound of the keep ratio: one element."""
        sizes = torch.tensor([len(imp) for imp in self.importance[kind]], dtype=torch.float32)
        bound = 1.0 / sizes
        return bound.max().expand(1) if self.keep_ratios[kind].numel() == 1 else bound

    def clamp_(self) -> None:
        """Keep every ratio in [1/N, 1] after an optimiser step."""
        with torch.no_grad():
            for kind, ratios in self.keep_ratios.items():
                low = self.min_keep_ratio(kind).to(ratios.device)
                ratios.copy_(torch.maximum(ratios.clamp(max=1.0), low))

    def _group_mask(self, kind: str, index: int) -> tuple[Tensor, Tensor]:
        """(mask, straight-through kept count) of one group in the current mode."""
        if kind in self.frozen:
            mask = self.frozen[kind][index]
            return mask, mask.sum().to(torch.float64)
        importance = self.importance[kind][index].unsqueeze(0)
        ratio = self.ratio(kind, index).reshape(1)
        temperature = self.temperatures[kind]
        hard = hard_mask(importance, keep_count(ratio, importance.shape[-1]))[0]
        if self.mode == "hard":
            return hard, hard.sum().to(torch.float64)
        soft = soft_mask(importance, ratio, temperature)[0]
        if self.mode == "soft":
            return soft, soft.sum().to(torch.float64)
        return hard + (soft - soft.detach()), straight_through_count(hard.sum(), soft)

    def refresh(self) -> None:
        """Compute this step's masks from the keep ratios and importances (before a forward)."""
        self.active, self._counts = {}, {}
        for kind in self.targets:
            if kind == "layers":
                mask, _ = self._group_mask(kind, 0)
                masks = [mask]
                self._counts[kind] = mask.to(torch.float64)
            else:
                pairs = [self._group_mask(kind, i) for i in range(self.geometry.num_layers)]
                masks = [m for m, _ in pairs]
                scale = self.channel_multiple if kind == "channels" else 1  # counts in channels, not groups
                self._counts[kind] = torch.stack([c for _, c in pairs]) * scale
            for mask in masks:
                if mask.requires_grad:
                    mask.retain_grad()
            self.active[kind] = masks
        # one host read per refresh (not per layer): which layers the forward drops
        layer_mask = self.active.get("layers", [None])[0]
        self._dropped = set() if layer_mask is None else {i for i, v in enumerate(layer_mask.tolist()) if v == 0.0}

    def deactivate(self) -> None:
        """Hooks pass everything through (the dense model) until the next ``refresh``."""
        self.active = None

    def kept_counts(self) -> dict[str, float]:
        """Kept attention units, channels (in kept layers) and layers at the last ``refresh``."""
        layers = self._counts.get("layers")
        keep = layers.detach() if layers is not None else None
        totals = {}
        for kind in ("heads", "channels"):
            if kind in self._counts:
                values = self._counts[kind].detach()
                totals[kind] = float((values * keep).sum() if keep is not None else values.sum())
        if keep is not None:
            totals["layers"] = float(keep.sum())
        return totals

    def param_count(self, counter) -> Tensor:
        """Differentiable parameter count of the masked model (after ``refresh``)."""
        device = self.keep_ratios[self.targets[0]].device
        geometry = self.geometry
        units = self._counts.get("heads", torch.tensor(geometry.units, dtype=torch.float64, device=device))
        channels = self._counts.get("channels", torch.tensor(geometry.channels, dtype=torch.float64, device=device))
        layers = self._counts.get("layers", torch.ones(geometry.num_layers, dtype=torch.float64, device=device))
        return counter.count_masked(layers, units.to(device), channels.to(device))

    # ---- importance --------------------------------------------------------------------
    def collect_scores(self, scale: float = 1.0) -> None:
        """Add this micro-batch's squared mask gradients ``(scale * dL/dm)^2`` to the pending scores.

        ``scale`` undoes a loss divided by the number of micro-batches, so each micro-batch
        contributes the squared gradient of its own mean loss.
        """
        for kind, masks in (self.active or {}).items():
            if kind in self.frozen or (kind == "layers" and self.layer_scores_external):
                continue
            for index, mask in enumerate(masks):
                grad = mask.grad
                if grad is None and mask.requires_grad and index in self._dropped and kind != "layers":
                    grad = torch.zeros_like(mask)  # a dropped layer's block had no backward: exactly zero
                if grad is not None:
                    score = (grad.detach().float() * scale).pow(2)
                    key = (kind, index)
                    self._pending[key] = self._pending[key] + score if key in self._pending else score

    def update_importance(self, beta: float = 0.99, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """EMA of squared mask gradients (after ``backward``), summed over micro-batches and ranks.

        The score of an element is ``(dL/dm)^2``: for a kept element (m = 1) this is the
        Taylor estimate of the loss change if it were removed; for a masked one (m = 0) it is
        the estimate of the change if it came back, so masked elements can return. ``reduce``
        sums the scores over data-parallel ranks so every rank keeps identical masks.
        """
        if not self._pending:
            self.collect_scores()
        if not self._pending:
            return
        keys = sorted(self._pending, key=lambda key: (TARGETS.index(key[0]), key[1]))  # same order on every rank
        scores = torch.cat([self._pending[key].reshape(-1) for key in keys])
        if reduce is not None:
            scores = reduce(scores)
        offset = 0
        for kind, index in keys:
            group = self.importance[kind][index]
            group.mul_(beta).add_(scores[offset : offset + group.numel()].to(group.device), alpha=1.0 - beta)
            offset += group.numel()
        self._pending = {}

    layer_scores_external = False

    def set_layer_importance(self, scores: Tensor, beta: float = 0.0) -> None:
        """Use measured layer scores (e.g. loss increase when skipped) as the layer importance."""
        self.layer_scores_external = True
        current = self.importance["layers"][0]
        current.mul_(beta).add_(scores.to(current), alpha=1.0 - beta)

    # ---- state (resume) ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {f"keep_ratio.{k}": v.detach().clone() for k, v in self.keep_ratios.items()}
        for kind, groups in self.importance.items():
            state.update({f"importance.{kind}.{i}": g.clone() for i, g in enumerate(groups)})
        for kind, groups in self.frozen.items():
            state.update({f"frozen.{kind}.{i}": g.clone() for i, g in enumerate(groups)})
        state["layer_scores_external"] = torch.tensor(self.layer_scores_external)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for kind, ratios in self.keep_ratios.items():
                ratios.copy_(state[f"keep_ratio.{kind}"])
            for kind, groups in self.importance.items():
                for i, group in enumerate(groups):
                    group.copy_(state[f"importance.{kind}.{i}"])
        self.frozen = {}
        for kind in self.targets:
            if f"frozen.{kind}.0" in state:
                count = len(self.importance[kind])
                self.frozen[kind] = [state[f"frozen.{kind}.{i}"].clone() for i in range(count)]
        self.layer_scores_external = bool(state.get("layer_scores_external", torch.tensor(False)))
