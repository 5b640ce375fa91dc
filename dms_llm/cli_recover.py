"""``dms-llm recover``: LoRA recovery of a pruned checkpoint, optionally distilled, resumable.

The output location, its disk room, the text source and the teacher are checked before any
weights load. With ``--save-every N`` a resumable adapter checkpoint is kept every N steps in
``OUTPUT-checkpoints/step-N``; ``--resume`` continues from the last one.

Example:
    dms-llm recover llama2-7b-dms20 --data alpaca --steps 200 --distill --save-every 50
    dms-llm recover llama2-7b-dms20 --data alpaca --steps 200 --distill --save-every 50 --resume
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_prune import _check_text_source
from .config import RecoverConfig
from .errors import DMSError


def recover_config(args: argparse.Namespace) -> RecoverConfig:
    """The recovery settings the flags give (validated)."""
    config = RecoverConfig(
        method="lora",
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        distill=args.distill,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        save_every=args.save_every,
    )
    config.validate()
    return config


def cmd_recover(args: argparse.Namespace) -> int:
    from .checkpoint import (
        check_output_dir,
        empty_model,
        load_config,
        load_model,
        resolve_device,
        resolve_dtype,
        save_pruned,
    )
    from .disk_space import check_room
    from .memory_room import check_weight_memory, weight_bytes
    from .output_lock import claim_output
    from .recover import recover, recovery_teacher
    from .recover_state import checkpoint_bytes, latest_checkpoint, require_checkpoint
    from .tokenizer_files import tokenizer_files_bytes

    if args.quiet:  # transformers' own bars too (loading, "Writing model shards"), as prune --quiet
        import transformers

        transformers.utils.logging.disable_progress_bar()

    config = recover_config(args)
    source = Path(args.model).expanduser()
    output = check_output_dir(args.output_dir or f"{str(source).rstrip('/')}-lora", args.overwrite)
    checkpoints = output.with_name(f"{output.name}-checkpoints")
    latest = require_checkpoint(checkpoints) if args.resume else latest_checkpoint(checkpoints)  # before any weights
    skeleton = empty_model(load_config(args.model))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    weights = weight_bytes(skeleton, dtype)
    if not args.device_map:  # before the dense teacher's pass (which load_model checks as it loads it)
        check_weight_memory(weights, device, dtype, f"the weights of {args.model!r}", copies=1)
    needed = weights + tokenizer_files_bytes(args.model)
    what = "the recovered checkpoint"
    if config.save_every:  # every adapter checkpoint is kept beside the output
        needed += config.steps // config.save_every * checkpoint_bytes(skeleton, config)
        what += " and its adapter checkpoints"
    check_room(output, needed, what)  # before the dense teacher and the training
    _check_text_source(config.data)
    report_path = source / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    teacher_name = args.teacher or report.get("model")
    if args.distill and not teacher_name:
        raise DMSError("--distill needs the dense model: pass --teacher (no report.json names it)")
    if args.distill:
        load_config(teacher_name)
    if latest is not None and not args.resume:
        print(f"note: {latest} is an earlier run's adapter checkpoint; pass --resume to continue it", file=sys.stderr)
    if config.save_every or args.resume:
        args.interrupt_note = f"no model was written; --resume continues from the last checkpoint in {checkpoints}"

    data = teacher = None
    if args.distill:  # the dense model's targets first, then it is freed: never two models in memory
        dense, dense_tokenizer = load_model(teacher_name, args.dtype, args.device, args.device_map)
        data, teacher = recovery_teacher(dense, dense_tokenizer, config, args.seed)
        del dense
    with claim_output(output):  # one run at a time into this folder
        model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map)
        folder = checkpoints if config.save_every or args.resume else None
        model, info = recover(
            model, tokenizer, config, teacher, args.seed, not args.quiet, folder, data, resume=args.resume
        )
        report["recovery"] = info
        save_pruned(model, tokenizer, output, report=report, overwrite=args.overwrite)
    before, after = info["heldout_before"], info["heldout_after"]
    if before is not None:
        print(
            f"held-out perplexity of the recovery data ({Path(str(config.data)).name}, seq {config.seq_len}): "
            f"{before:.3f} -> {after:.3f}"
        )
    print(f"saved to {output}")
    return 0
