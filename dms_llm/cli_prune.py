"""``dms-llm prune``: settings, the checks that need no weights, and the run on every rank.

Settings come from (lowest to highest): defaults < ``--recipe`` < flags < ``key=value``. The
architecture, budget, text sources and output location are checked before any weights load.

Example:
    dms-llm prune ./stories260K --ratio 0.2 --calib stories.txt search.steps=200 layout=uniform
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import shutil
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .errors import DMSError


def _model_or_override(args: argparse.Namespace) -> None:
    """``dms-llm prune --recipe R search.steps=5``: argparse takes the first ``key=value`` as the model."""
    model = getattr(args, "model", None)
    if model and "=" in model and not Path(model).expanduser().exists():
        args.overrides = [model, *(args.overrides or [])]
        args.model = None


def _prune_config(args: argparse.Namespace):
    from .cli import PRUNE_FLAGS

    _model_or_override(args)
    from .config import PruneConfig, apply_overrides, load_recipe, merge_settings

    config = load_recipe(args.recipe) if args.recipe else PruneConfig()
    flags = {key: getattr(args, key) for key, _, _ in PRUNE_FLAGS.values() if hasattr(args, key)}
    if "ratio" in flags and "params" in flags:
        raise DMSError("give either --ratio or --params, not both")
    if "params" in flags:
        flags["ratio"] = None  # an absolute target replaces the recipe's ratio
    elif "ratio" in flags:
        flags["params"] = None
    if args.gradient_checkpointing:
        flags["search.gradient_checkpointing"] = True
    if args.no_eval:
        flags["eval.heldout"] = False
    if args.distill:
        flags["recover.distill"] = True
    if args.shard:
        flags["shard"] = True
    config = apply_overrides(merge_settings(config, flags), args.overrides)
    if args.eval and not (config.eval.ppl or config.eval.tasks):
        config.eval.ppl, config.eval.tasks = ["wikitext2"], ["default"]
    return config.validate()


def _default_output(model: str, config) -> str:
    name = Path(model.rstrip("/")).name or "model"
    suffix = f"{round(config.ratio * 100)}" if config.ratio is not None else str(config.params)
    return f"{name}-dms-{suffix}"


def cmd_prune(args: argparse.Namespace) -> int:
    from .config import recipe_model

    _model_or_override(args)
    args.model = args.model or (recipe_model(args.recipe) if args.recipe else None)
    if not args.model:
        raise DMSError("name the model to prune (a Hub name or a folder), or a --recipe that names one")
    from .checkpoint import check_output_dir
    from .disk_space import check_room, free_bytes, size_text

    config = _prune_config(args)
    output_dir = check_output_dir(args.output_dir or _default_output(args.model, config), args.overwrite)
    args.calibration, plan = _check_before_loading(args.model, config, args.push_to_hub)
    if args.dry_run and os.environ.get("RANK", "0") == "0":  # one plan under a launcher
        from .plan import render_plan

        print(render_plan(plan))
        print(f"output: {output_dir} (not created: --dry-run; {size_text(free_bytes(output_dir))} free on its disk)")
    memory = _check_memory(plan, config)
    if args.dry_run and memory and os.environ.get("RANK", "0") == "0":
        print(memory)
    # hours of search must not end on a full disk: the checkpoint and the search state must fit now
    check_room(output_dir, plan.disk_bytes, "the checkpoint" + (" and the search state" if plan.state_bytes else ""))
    if args.dry_run:  # every check has passed; nothing was loaded or written
        return 0

    from .launch import make_accelerator, relaunch_cpu_ranks, requested_cpu_processes, uses_fsdp

    if (processes := requested_cpu_processes()) > 1:
        print(f"accelerate launch --cpu starts one process; dms-llm starts the {processes} CPU ranks (torch elastic)")
        return relaunch_cpu_ranks(processes, args.argv)

    from .output_lock import claim_output

    # one process, or each rank of `torchrun` / `accelerate launch -m dms_llm prune ...`
    accelerator = make_accelerator(config.device)
    shard = config.shard or uses_fsdp(accelerator)  # an accelerate FSDP config means the same as --shard
    if shard and accelerator.num_processes < 2:
        raise DMSError("--shard splits the model over several processes: launch with torchrun or accelerate launch")
    if shard and config.device_map:
        raise DMSError("--shard and --device-map both split the model; choose one")
    if shard and args.resume and config.search.mode == "joint":
        raise DMSError("a sharded joint search keeps no resumable state; rerun without --resume")
    main = accelerator.is_main_process
    # only the main process writes: it alone holds the output (a second run into it fails at once)
    with claim_output(output_dir) if main else nullcontext([]) as litter:
        if litter:
            print(f"removed {len(litter)} leftovers of a killed run: {', '.join(p.name for p in litter)}")
        return _search_and_save(args, config, output_dir, accelerator, shard)


def _search_and_save(args: argparse.Namespace, config, output_dir: Path, accelerator, shard: bool) -> int:
    import json

    from rich.console import Console

    from .checkpoint import load_model, save_pruned
    from .pipeline import prune

    calibration = args.calibration
    main = accelerator.is_main_process
    console = Console(quiet=not main)
    if args.quiet or not main:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    # every rank uses its own device; a plain "cuda" would put all ranks on GPU 0
    device = str(accelerator.device) if config.device in ("auto", "cuda") else config.device
    state_dir = output_dir.with_name(f".{output_dir.name}.search-state")
    if config.search.save_every:
        args.interrupt_note = f"no model was written; the search state is kept in {state_dir}: add --resume to continue"
    console.print(f"loading {args.model} ...", markup=False, highlight=False)
    if config.device_map and accelerator.num_processes > 1:
        raise DMSError("--device-map shards one model in one process; do not combine it with accelerate launch")
    model, tokenizer = load_model(
        args.model, dtype=config.dtype, device=device, device_map=config.device_map, shard=shard
    )
    if main and state_dir.exists() and not args.resume:
        console.print(f"note: {state_dir} holds an interrupted search; pass --resume to continue it", markup=False)
    with _keeping_the_search_on_a_full_disk(state_dir):
        model, report = prune(
            model,
            tokenizer,
            config,
            calibration=calibration,
            progress=not args.quiet,
            accelerator=accelerator,
            state_dir=state_dir,
            resume=args.resume,
        )
    if not main:  # only the main process touches the output folder
        return 0
    # a local base model is stored as an absolute path: `recover --distill` finds it from any folder
    local = Path(args.model).expanduser()
    report.model = str(local.resolve()) if local.is_dir() else args.model
    report.command = "dms-llm " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["prune"] else None
    extra = {"eval.json": json.dumps(report.evaluation, indent=2) + "\n"} if report.evaluation else None
    with _keeping_the_search_on_a_full_disk(state_dir):
        save_pruned(model, tokenizer, output_dir, report=report.to_dict(), overwrite=args.overwrite, extra_files=extra)
    shutil.rmtree(state_dir, ignore_errors=True)  # the checkpoint is safe: the search state is not needed
    sys.stdout.write(report.render(width=max(console.width, 100)))
    print(f"saved to {output_dir}")
    if args.push_to_hub:
        from .hub import push_to_hub

        try:
            url = push_to_hub(output_dir, args.push_to_hub, private=args.private)
        except DMSError as error:
            raise DMSError(f"saved to {output_dir}, but {error}") from None
        print(f"uploaded to {args.push_to_hub}: {url}")
    return 0


@contextmanager
def _keeping_the_search_on_a_full_disk(state_dir: Path):
    """A disk that fills up after the search has saved its state: say how to get the result back."""
    from .disk_space import DiskFullError

    try:
        yield
    except DiskFullError as error:
        if not state_dir.exists() or error.code == errno.EFBIG:  # a file-size limit stays: no rerun helps
            raise
        raise DiskFullError(
            f"{error}. The search state is kept in {state_dir}: once there is room, rerun the same command "
            "with --resume to continue from its last save instead of starting over",
            error.code,
        ) from None


def _check_before_loading(model: str, config, push_to: str | None = None):
    """Everything that needs no weights, so that bad input fails in seconds: device, architecture,
    budget, Hub repository id, every text source; returns the calibration blocks (the tokenizer is
    light, and a calibration file shorter than one block is found here, not after loading) and the
    run's plan (exact counts, memory and disk, from the config alone: what ``--dry-run`` prints)."""
    from transformers import AutoTokenizer

    from .checkpoint import resolve_device
    from .data import calibration_blocks
    from .model_files import check_model_download_room
    from .plan import calibration_setting, prune_plan
    from .tokenizer_files import tokenizer_files_bytes

    resolve_device(config.device)  # --device cuda on a machine without one: say so now
    plan = prune_plan(model, config, launched=_launched_processes())  # exact counts: an unreachable budget fails here
    if not Path(model).expanduser().is_dir():  # a Hub model: its weights must fit in the cache
        check_model_download_room(model)
    narrowest = plan.mlp_width[0]
    if config.channel_multiple > narrowest:
        raise DMSError(f"--channel-multiple {config.channel_multiple} is larger than the narrowest MLP ({narrowest})")
    if push_to:
        from .hub import check_repo_id

        check_repo_id(push_to)
    for source in config.eval.ppl:
        _check_text_source(source)
    if config.eval.task_data and not Path(config.eval.task_data).expanduser().is_dir():
        raise DMSError(f"task data folder {config.eval.task_data!r} does not exist")
    if config.recover.method:
        _check_text_source(config.recover.data)
    _check_text_source(config.data.calib, config.data.text_field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DMSError(f"could not load the tokenizer of {model!r}: {first}") from None
    calibration = calibration_blocks(tokenizer, config.data, config.seed)
    plan.settings["calibration"] = calibration_setting(calibration, config)
    plan.tokenizer_bytes = tokenizer_files_bytes(model)  # now in the Hub cache, if it was not before
    return calibration, plan


def _launched_processes() -> int:
    """Ranks of this launch: torchrun's, or those dms-llm starts for ``accelerate launch --cpu``."""
    from .launch import launched_ranks, requested_cpu_processes

    return max(launched_ranks()[1], requested_cpu_processes())


def _check_memory(plan, config) -> str | None:
    """Each process's weights (its rows under --shard; in joint mode with their gradients and AdamW
    moments) and lora mode's adapters must fit where they load, every local CPU rank holding its
    own: refused before any download (``memory_room``).
    Checked before the ranks join, so no rank has loaded anything yet."""
    from .checkpoint import DTYPES, resolve_device
    from .disk_space import size_text
    from .launch import fsdp_requested, requested_cpu_processes
    from .memory_room import check_weight_memory, local_copies

    if config.device_map:  # Accelerate places the layers over the devices, offloading what does not fit
        return
    device, processes = resolve_device(config.device), _launched_processes()
    sharded = (config.shard or fsdp_requested()) and processes > 1
    # joint mode trains every weight with AdamW: gradients and two moments in the weights' dtype
    joint = config.method == "dms" and config.search.resolved().mode == "joint"
    weights = plan.shard_rank_bytes[processes] if sharded else plan.weight_bytes
    needed = (4 if joint else 1) * weights + (plan.adapter_bytes or 0)
    copies = max(local_copies(device), requested_cpu_processes())  # CPU ranks share the host's memory
    what = f"the weights of {plan.model!r}" + (" (this rank's rows)" if sharded else "")
    what += " with their gradients and AdamW moments (joint mode)" if joint else ""
    what += " and the search's LoRA adapters" if plan.adapter_bytes else ""
    fix = "--mode lora (the default) trains adapters on frozen weights instead; or " if joint else ""
    available = check_weight_memory(needed, device, DTYPES[plan.dtype], what, copies, fix)
    if available is None:
        return None
    each = f"{copies} processes x " if copies > 1 else ""
    return f"memory: {what.removeprefix('the ')} take {each}{size_text(needed)}; {device} has {size_text(available)}"


def _check_text_source(source: str, text_field: str = "text") -> None:
    """A local text file is read (and so checked: missing, empty, binary, not UTF-8, a .jsonl without
    its field) before the model loads; a named dataset is left to its loader."""
    from .data import NAMED_SOURCES, load_text

    path = Path(source).expanduser()
    if source in NAMED_SOURCES and not path.exists():
        return
    if not path.exists():
        raise DMSError(f"text file {source!r} does not exist (or name one of {', '.join(NAMED_SOURCES)})")
    if path.is_file() and path.stat().st_size == 0:
        raise DMSError(f"text file {source!r} is empty")
    load_text(source, text_field=text_field)
