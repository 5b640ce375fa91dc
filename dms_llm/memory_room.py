"""Refuse a run whose weights cannot fit in the memory of the device they would load on.

Llama-2-7B in float32 (25 GiB, the CPU's default dtype) on a 16 GB machine ends with the kernel
killing the process part-way through the load ("Killed", no message), after a 13 GB download; on
a GPU too small it ends in a CUDA out-of-memory traceback. Both are known from the config alone,
so they are refused before anything is downloaded or read, in one line that says what fits.

Only what is certain is counted: the weights in the dtype they load in (and lora mode's adapters
with their optimizer state). Activations depend on the batch and the kernels, so a run that passes
can still run out later; a run that fails this check cannot succeed. On the host, free swap counts
as memory (slow, but it works); local ranks of one launch each hold their own copy there.

Example:
    >>> cpu = torch.device("cpu")
    >>> check_weight_memory(25 * 2**30, cpu, torch.float32, "the weights of 'llama-7b'")  # doctest: +SKIP
    Traceback (most recent call last):
    dms_llm.errors.DMSError: the weights of 'llama-7b' take 25.00 GiB in float32, more than ...
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .disk_space import size_text
from .errors import DMSError


def this_process_device(device: torch.device) -> torch.device:
    """``device`` with the GPU index this process uses (a launcher's local rank for a bare ``cuda``)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _read_number(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, unreadable, or "max" (no limit)
        return None


def _file_cache(stat: Path, key: str) -> int:
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith(f"{key} ")), 0)


def container_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this container's memory limit (cgroup v2, else v1); None without a limit.

    In a container (Docker, a Kubernetes pod) the host's free memory says nothing of the limit the
    kernel kills at. Page cache counts against the limit but is given back under pressure, so it is
    counted as free: a downloaded checkpoint's cached pages must not look like used memory.
    """
    for limit_file, usage_file, stat_file, cache_key in (
        (root / "memory.max", root / "memory.current", root / "memory.stat", "file"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes",
         root / "memory" / "memory.stat", "total_cache"),
    ):  # fmt: skip
        limit, usage = _read_number(limit_file), _read_number(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as ~2**63
            return max(0, limit - usage + _file_cache(stat_file, cache_key))
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes that new tensors can take on ``device``: the host's available memory plus free swap,
    within the container's limit (CPU), or the GPU's free memory (CUDA, after other processes' use);
    None where it cannot be told."""
    if device.type == "cpu":
        import psutil

        host = psutil.virtual_memory().available + psutil.swap_memory().free
        room = container_room()
        return host if room is None else min(host, room)
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            free, _ = torch.cuda.mem_get_info(this_process_device(device))
        except RuntimeError:  # e.g. a rank whose GPU is hidden from it: the load itself will say so
            return None
        return free
    return None


def local_copies(device: torch.device) -> int:
    """How many processes of this launch load a model into the same memory: every local rank of a
    CPU launch shares the host's; GPU ranks each have a GPU of their own."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1


def _fixes(device: torch.device, dtype: torch.dtype, copies: int, fits_in_half: bool) -> str:
    """What would make it fit, in the order worth trying."""
    fixes = ["--dtype bfloat16 halves the weights (then they fit)"] if dtype == torch.float32 and fits_in_half else []
    if device.type == "cuda":
        fixes.append("--device-map auto spreads the layers over all GPUs (and the CPU)")
        fixes.append("launching several ranks with --shard splits every layer over them")
    elif copies > 1:
        fixes.append(f"start fewer than {copies} processes (each holds the whole model), or split it with --shard")
    else:
        fixes.append("run on GPUs (--device-map auto spreads one model over them; --shard splits it over ranks)")
    return "; or ".join(fixes)


def check_weight_memory(
    needed: int, device: torch.device, dtype: torch.dtype, what: str, copies: int | None = None, fix: str = ""
) -> int | None:
    """Refuse (DMSError) when ``copies`` processes (default: this launch's local ranks on the host,
    one on a GPU) of ``needed`` bytes each exceed what ``device`` has available now; else return
    what it has (None where that cannot be told). ``fix``: a first remedy to suggest."""
    available = available_memory(device)
    copies = copies or local_copies(device)
    if available is None or needed * copies <= available:
        return available
    where = (
        f"{this_process_device(device)} has free"
        if device.type == "cuda"
        else "this machine has available (memory and free swap, within a container's limit)"
    )
    each = f" in each of {copies} processes ({size_text(needed * copies)} in all)" if copies > 1 else ""
    raise DMSError(
        f"{what} take {size_text(needed)} in {str(dtype).removeprefix('torch.')}{each}, more than the "
        f"{size_text(available)} {where}; {fix}{_fixes(device, dtype, copies, needed * copies <= 2 * available)}"
    )


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a (meta-device) model's parameters in ``dtype``; tied weights count once."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize
