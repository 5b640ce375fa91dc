"""Multi-process runs: the Accelerator every rank builds, and the CPU ranks accelerate leaves out.

``torchrun --nproc_per_node N -m dms_llm prune ...`` and ``accelerate launch --num_processes N
-m dms_llm prune ...`` start N ranks. Each rank builds ``make_accelerator``; the ranks split the
calibration blocks and keep identical masks, and only the main process writes.

Two launcher details this module absorbs:
- without CUDA, ``Accelerator()`` ignores the ranks torchrun started (each believes it is alone
  and main); ``cpu=True`` makes it join them over gloo.
- ``accelerate launch --cpu --num_processes N`` starts a single process (accelerate starts several
  CPU processes only through MPI) and passes N nowhere; ``relaunch_cpu_ranks`` reads N from the
  launcher's own command line and starts the N ranks with torch elastic, as torchrun would.

Example:
    >>> accelerator = make_accelerator("cpu")          # doctest: +SKIP
    >>> accelerator.num_processes                      # doctest: +SKIP
    2
"""

from __future__ import annotations

import logging
import os
import sys
import uuid


def make_accelerator(device: str = "auto"):
    """The Accelerator of this rank: gloo on CPUs, the GPU backend when CUDA is used."""
    import torch
    from accelerate import Accelerator

    use_cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=use_cpu)


def uses_fsdp(accelerator) -> bool:
    """True when the launcher's accelerate config asks for FSDP (``--use_fsdp`` or a config file)."""
    from accelerate import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed(accelerator, sharded: bool = False) -> None:
    """Refuse an FSDP launch for a model that is not sharded (every rank would hold all of it)."""
    from .errors import DMSError

    if uses_fsdp(accelerator) and not sharded:
        raise DMSError(
            "this accelerate config asks for FSDP, but the model is whole on every rank: load it with "
            "dms_llm.load_sharded (the CLI does this under FSDP and with --shard)"
        )


def fsdp_requested() -> bool:
    """True when ``accelerate launch`` was given an FSDP config (readable before the ranks join)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def launched_ranks() -> tuple[int, int]:
    """(this process's rank, number of ranks) that torchrun or ``accelerate launch`` started; (0, 1) alone."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def requested_cpu_processes() -> int:
    """N when this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1), else 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 1
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no parent to read (containers without /proc access): nothing to correct
        return 1
    if "launch" not in parent:
        return 1
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(parent[parent.index("launch") + 1 :])
    except SystemExit:
        return 1
    count = args.num_processes
    if count is None and args.config_file:
        from accelerate.commands.config.config_args import load_config_from_file

        count = load_config_from_file(args.config_file).num_processes
    return int(count or 1) if args.cpu else 1


def relaunch_cpu_ranks(processes: int, argv: list[str]) -> int:
    """Run ``python -m dms_llm ARGV`` as ``processes`` CPU ranks (torch elastic); returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the ranks print their own one-line errors; elastic's log of the same failure is noise
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        run_id=str(uuid.uuid4()),
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "dms_llm", *argv)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code and code > 0), 1)
    return 0
