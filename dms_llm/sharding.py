"""Sharded searches: the decoder layers split over the ranks with PyTorch FSDP (``fully_shard``).

Data-parallel ranks each hold the whole model; a 70B model does not fit on one 80 GB GPU. With
``--shard`` (or an accelerate FSDP config) every decoder layer becomes one FSDP unit: each rank
keeps 1/N of its rows, and the layer is gathered just for its forward and backward. What the
search learns is unaffected: the masks are hooks on the projections and stay replicated, and the
keep-ratio gradients are averaged over the ranks as in a data-parallel run. So are lora mode's
adapters: peft wraps the sharded projections after ``fully_shard``, the adapters stay whole on every
rank (FSDP does not manage them), and at the end each rank merges its rows of every adapter's
product into its own shard (``merge_search_adapters``).

The embedding, final norm and ``lm_head`` stay whole on every rank (about 3% of a 70B model):
the chunked loss multiplies by ``lm_head.weight`` itself, and a tied head is the embedding.

- ``load_sharded`` reads each rank's rows straight from the safetensors files: no rank ever
  holds a whole layer it does not own, and nothing goes through a full host copy.
- ``gather_pruned`` gives the main rank the pruned model on the host after the search, each
  layer sliced as it is gathered; the other ranks get None.
- ``check_pruned_fits_main_device``: the pruned model's evaluation and recovery run whole on the
  main rank's GPU, so a run whose pruned model cannot fit there is refused before the search,
  not after it.

Example:
    >>> model = load_sharded("meta-llama/Llama-3.1-70B", torch.bfloat16, torch.device("cuda", 0))  # doctest: +SKIP
    >>> is_sharded(model)                                                                           # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import DMSError


def is_sharded(model: nn.Module) -> bool:
    """True when some of the model's parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_layers(model: nn.Module, adapter, device: torch.device) -> nn.Module:
    """Make every decoder layer of ``model`` one FSDP unit over all ranks (in place); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise DMSError("--shard needs several processes: launch with torchrun or accelerate launch")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in adapter.decoder_layers(model):
        # gathered for its forward, freed after it, gathered again for the backward
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return model


def local_rows(rows: int, rank: int, world: int) -> slice:
    """The rows FSDP gives ``rank`` of a dimension of ``rows`` (``torch.chunk``: ceil-sized pieces)."""
    size = math.ceil(rows / world)
    return slice(min(rank * size, rows), min((rank + 1) * size, rows))


def load_sharded(name_or_path: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model with its decoder layers sharded over the ranks, each rank reading only its rows."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    from .adapters import get_adapter
    from .checkpoint import empty_model
    from .model_files import download_model, weight_files

    folder = download_model(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "dms_layer_shapes", None):
        raise DMSError(f"{name_or_path!r} is already pruned per layer; --shard loads dense models only")
    model = empty_model(config)  # parameters on meta, buffers (rotary frequencies) real
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to(dtype)  # the parameters' dtype; the buffers are put back in their own below
    shard_layers(model, get_adapter(config), device)
    model.to_empty(device=device)  # this rank's shards and the replicated tensors, uninitialised
    _restore_buffers(model, buffers, device)
    params, seen = dict(model.named_parameters()), set()
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu", backend="pread") as handle:
                seen |= _fill_shards(handle, params, dtype, device, f"{file.name} ({config.model_type})")
        except SafetensorError as error:
            raise DMSError(f"could not read {file}: {error} (a truncated or corrupt safetensors file?)") from None
    model.tie_weights()
    missing = [name for name in dict(model.named_parameters()) if name not in seen]
    if missing:
        raise DMSError(f"{Path(folder).name} has no weights for {missing[:3]}: not a complete checkpoint")
    model.config._name_or_path = str(name_or_path)
    model.config.dtype = dtype
    return model.eval()


@torch.no_grad()
def _fill_shards(handle, params: dict, dtype: torch.dtype, device: torch.device, where: str) -> set[str]:
    """Copy this rank's rows of every tensor in one safetensors file into ``params``; returns the keys."""
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
        if key not in params:
            raise DMSError(f"{where} holds {key!r}, which the model has no place for")
        target = params[key]
        if isinstance(target, DTensor):  # read only the rows this rank owns
            local = target.to_local()
            tensor = handle.get_slice(key)[local_rows(target.shape[0], rank, world)]
        else:
            local, tensor = target, handle.get_tensor(key)
        if tuple(tensor.shape) != tuple(local.shape):
            raise DMSError(f"{key} in {where} has shape {tuple(tensor.shape)}, not the config's")
        local.copy_(tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))
    return set(handle.keys())


def gather_pruned(model: nn.Module, arch, layout: str = "per_layer", adapter=None) -> nn.Module | None:
    """The model sliced to ``arch`` on the main rank's host (None on the others); every rank calls it.

    The layers are gathered one at a time and each is sliced as soon as it arrives, so the main
    rank's host never holds more than the pruned model and one whole layer (a 70B model pruned by
    half: 69 GB, not 138 GB), and a dropped layer is never gathered at all.

    Example:
        >>> pruned = gather_pruned(sharded_model, result.architecture)   # doctest: +SKIP
    """
    from torch.distributed.tensor import DTensor

    from .adapters import get_adapter
    from .checkpoint import empty_model
    from .slicing import check_slicing, finish_slicing, slice_layer

    adapter = adapter or get_adapter(model.config)
    geometry = check_slicing(model, arch, layout, adapter)  # on every rank: all raise, or none
    main = dist.get_rank() == 0
    whole = empty_model(model.config) if main else None

    def host(tensor: torch.Tensor) -> torch.Tensor | None:  # a shard's gather is collective: every rank runs it
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return full.detach().to("cpu") if main else None  # only main keeps a host copy

    layers, prefix = adapter.decoder_layers(model), adapter.layers_path + "."
    targets = adapter.decoder_layers(whole) if main else None
    for index in arch.kept_layers:
        state = {name: host(param) for name, param in layers[index].named_parameters()}
        if main:
            targets[index].load_state_dict(state, assign=True)
            slice_layer(targets[index], index, arch, geometry, adapter)
    # the embedding, final norm and head: replicated (a tied head is the embedding, listed once)
    rest = {name: host(param) for name, param in model.named_parameters() if not name.startswith(prefix)}
    if not main:
        return None
    whole.load_state_dict(rest, strict=False, assign=True)
    whole.tie_weights()
    _restore_buffers(whole, dict(model.named_buffers()), torch.device("cpu"))
    finish_slicing(whole, arch, geometry, adapter)
    if any(p.is_meta for p in whole.parameters()):
        raise RuntimeError("gathering the sharded model left parameters unset")
    return whole.requires_grad_(False).eval()


def _restore_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put saved buffers back (rotary frequencies stay float32 in a bfloat16 model, as transformers has them)."""
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters every rank holds whole (embedding, final norm, head): their gradients need averaging."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if not isinstance(p, DTensor)]


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights this rank holds (its shards and the replicated tensors)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        total += local.numel() * local.element_size()
    return total


# what evaluation and LoRA recovery need on top of the pruned weights (activations, adapters, logits)
EVAL_HEADROOM = 1.1


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes a whole model could still take on ``device``; None where the host holds it (no GPU limit)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)


def check_pruned_fits(pruned_bytes: int, free_bytes: int | None, uses: str) -> None:
    """Refuse a sharded run whose pruned model (``pruned_bytes``) cannot be evaluated or recovered
    on the main rank's GPU (``free_bytes`` there; None: no limit). ``uses`` names what needs it.

    Example:
        >>> check_pruned_fits(112 * 10**9, 60 * 10**9, "the held-out perplexity")  # doctest: +SKIP
        DMSError: the pruned model (112.0 GB) will not fit on the main rank's GPU (60.0 GB free) ...
    """
    if free_bytes is None or pruned_bytes * EVAL_HEADROOM <= free_bytes:
        return
    raise DMSError(
        f"the pruned model ({pruned_bytes / 1e9:.1f} GB) will not fit on the main rank's GPU "
        f"({free_bytes / 1e9:.1f} GB free beside its shard), where {uses} would run after the search. "
        "Pass --no-eval (and leave out --ppl, --tasks and --recover) to prune and save it, then evaluate "
        "with `dms-llm eval OUTPUT --device-map auto` and recover with `dms-llm recover`"
    )


def check_pruned_fits_main_device(model: nn.Module, pruned_params: int, uses: str) -> None:
    """``check_pruned_fits`` for a sharded ``model`` with the main rank's free GPU memory, sent to every
    rank so that all of them raise the same error (none is left waiting in a collective)."""
    device = model.get_input_embeddings().weight.device
    free = device_free_bytes(device)
    main_free = torch.tensor([-1 if free is None else free], dtype=torch.int64)
    if dist.is_initialized():
        main_free = main_free.to(device)
        dist.broadcast(main_free, src=0)
    element = next(model.parameters()).dtype.itemsize
    free_on_main = int(main_free.item())
    check_pruned_fits(pruned_params * element, None if free_on_main < 0 else free_on_main, uses)
