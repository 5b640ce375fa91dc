"""The ``dms-llm`` command line: ``prune`` (in ``cli_prune``), ``eval``, ``recover``, ``push``, ``export``, ``recipes``.

Bad input prints one ``dms-llm: error: ...`` line and exits with status 2.

Example:
    dms-llm prune meta-llama/Llama-2-7b-hf --ratio 0.2 --calib wikitext2 --output-dir llama2-7b-dms20
    dms-llm prune ./stories260K --ratio 0.2 --calib stories.txt search.steps=200 layout=uniform
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_prune import _check_text_source, _prune_config, cmd_prune  # noqa: F401 (_prune_config: tests)
from .cli_recover import cmd_recover
from .config import METHODS, PruneConfig, RecoverConfig
from .errors import DMSError
from .launch import launched_ranks

DTYPE_HELP = "auto (default: bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16"
DEVICE_HELP = "auto (default: a GPU if there is one), cpu, cuda, cuda:N"
DEVICE_MAP_HELP = "auto: spread the model's layers over all GPUs of this process (a model larger than one GPU)"

# flag -> (config key, type, help)
PRUNE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--ratio": ("ratio", float, "fraction of the total parameter count to remove, e.g. 0.2"),
    "--params": ("params", str, "absolute target size instead of --ratio, e.g. 5.4B or 180000"),
    "--calib": (
        "data.calib",
        str,
        "calibration text: wikitext2 (the default, from the Hub), c4, alpaca, or a .txt/.jsonl/.parquet file",
    ),
    "--calib-split": ("data.split", str, "split of a named calibration dataset (default train)"),
    "--text-field": ("data.text_field", str, "text field of .jsonl/.parquet rows (default text)"),
    "--num-blocks": ("data.num_blocks", int, "distinct calibration blocks"),
    "--seq-len": ("data.seq_len", int, "tokens per calibration block"),
    "--steps": ("search.steps", int, "search steps"),
    "--batch-size": ("search.batch_size", int, "blocks per step (per process)"),
    "--lr": ("search.lr", float, "learning rate of the keep ratios"),
    "--budget-weight": ("search.budget_weight", float, "weight w of the budget penalty"),
    "--targets": ("targets", str, "what to prune: a subset of heads,channels,layers"),
    "--layout": ("layout", str, "per_layer (default) or uniform (stock config, loads anywhere)"),
    "--channel-multiple": ("channel_multiple", int, "kept MLP widths in multiples of M (32: q8_0, 256: k-quants)"),
    "--seed": ("seed", int, "random seed"),
    "--mode": (
        "search.mode",
        str,
        "auto (default: lora, also with --shard), structure (weights frozen), "
        "lora (LoRA adapters train with the ratios) or joint (all weights train)",
    ),
    "--loss": (
        "search.loss",
        str,
        "auto (default: task+kd in lora/joint mode, task in structure mode), task (cross-entropy), "
        "kd (KL to the dense model) or task+kd",
    ),
    "--method": ("method", str, f"dms (default), or a peer's criterion: {', '.join(METHODS[1:])}"),
    "--grad-accum": ("search.grad_accum", int, "micro-batches per step and process"),
    "--dtype": ("dtype", str, DTYPE_HELP),
    "--device": ("device", str, DEVICE_HELP),
    "--device-map": ("device_map", str, DEVICE_MAP_HELP),
    "--eval-seq-len": ("eval.seq_len", int, "perplexity window in tokens (default 128)"),
    "--eval-ppl": ("eval.ppl", str, "also evaluate perplexity on: wikitext2,ptb,c4 or text files"),
    "--eval-tasks": ("eval.tasks", str, "also run lm-eval tasks (names, or 'default' for the 7 standard)"),
    "--eval-limit": ("eval.limit", float, "items per lm-eval task (quick runs)"),
    "--task-data": ("eval.task_data", str, "folder of local task files (offline lm-eval)"),
    "--recover": ("recover.method", str, "recover after pruning: lora"),
    "--recover-data": ("recover.data", str, "recovery text: alpaca, a named source or a file"),
    "--recover-steps": ("recover.steps", int, "LoRA recovery steps"),
}


def _config_value(config, key: str):
    """``config``'s value at a dotted key, e.g. ``search.steps``."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _with_default(text: str, value) -> str:
    """The help text with its default appended, unless it names one already or there is none."""
    if "default" in text or value in (None, [], ""):
        return text
    shown = ",".join(value) if isinstance(value, list) else value
    return f"{text} (default {shown})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dms-llm", description="Structured pruning of Llama-family models with DMS.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"dms-llm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    prune = verbs.add_parser("prune", help="prune a model to a parameter budget")
    prune.add_argument("model", nargs="?", help="Hugging Face model name or local folder (default: the recipe's)")
    prune.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. search.steps=500")
    prune.add_argument("--recipe", help="recipe name (see `dms-llm recipes`) or YAML file")
    prune.add_argument("--output-dir", "-o", help="where to write the pruned model (default: ./NAME-dms-RATIO)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prune.add_argument("--gradient-checkpointing", action="store_true", default=None, help="save activation memory")
    prune.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity")
    prune.add_argument("--eval", action="store_true", help="evaluate dense and pruned (WikiText-2 + 7 tasks)")
    prune.add_argument("--distill", action="store_true", help="distil from the dense model during --recover")
    prune.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result with a model card")
    prune.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    prune.add_argument("--quiet", action="store_true", help="no progress bar")
    prune.add_argument("--resume", action="store_true", help="continue an interrupted search from its saved state")
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the parameter counts, settings and weight memory, load and write nothing",
    )
    prune.add_argument(
        "--shard", action="store_true", help="under torchrun/accelerate: split the layers over the ranks (FSDP)"
    )
    defaults = PruneConfig()
    for flag, (key, kind, text) in PRUNE_FLAGS.items():
        metavar = flag.lstrip("-").split("-")[-1].upper()
        # a recipe's value replaces these defaults: the flag itself defaults to "not given"
        help_text = _with_default(text, _config_value(defaults, key))
        prune.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=metavar)
    prune.set_defaults(func=cmd_prune)

    evaluate = verbs.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or pruned model")
    evaluate.add_argument("model", help="Hugging Face model name or local folder (dense or pruned)")
    evaluate.add_argument("--ppl", help="perplexity sources: wikitext2, ptb, c4 or text files (default wikitext2)")
    evaluate.add_argument("--tasks", help="lm-eval tasks, comma separated, or 'default' for the standard 7")
    evaluate.add_argument("--seq-len", type=int, default=128, help="perplexity window in tokens (default 128)")
    evaluate.add_argument(
        "--batch-size", type=int, default=8, help="perplexity windows and lm-eval requests per forward (default 8)"
    )
    evaluate.add_argument("--limit", type=float, help="items per lm-eval task (quick runs)")
    evaluate.add_argument("--task-data", help="folder of local task files (offline lm-eval)")
    evaluate.add_argument(
        "--output", help="results file (default: MODEL/eval.json; ./NAME-eval.json for Hub names or read-only folders)"
    )
    evaluate.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    evaluate.add_argument("--device", default="auto", help=DEVICE_HELP)
    evaluate.add_argument("--device-map", help=DEVICE_MAP_HELP)
    evaluate.set_defaults(func=cmd_eval)

    recover = verbs.add_parser("recover", help="LoRA-recover a pruned model (optionally distilled) and merge")
    recovery = RecoverConfig()  # the one place the recovery defaults live (prune --recover uses it too)
    recover.add_argument("model", help="pruned model folder (either layout)")
    recover.add_argument(
        "--data", default=recovery.data, help="alpaca (default), a named source, or a .txt/.jsonl/.parquet file"
    )
    recover.add_argument("--output-dir", "-o", help="where to write the recovered model (default: MODEL-lora)")
    recover.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for flag, kind, key, text in (
        ("--steps", int, "steps", "optimizer steps"),
        ("--batch-size", int, "batch_size", "blocks per step"),
        ("--seq-len", int, "seq_len", "tokens per block"),
        ("--lr", float, "lr", "learning rate of the adapters"),
        ("--lora-r", int, "lora_r", "LoRA rank (alpha = 2 x rank)"),
    ):
        default = getattr(recovery, key)
        recover.add_argument(flag, type=kind, default=default, help=_with_default(text, default))
    recover.add_argument("--distill", action="store_true", help="KL distillation from the dense teacher")
    recover.add_argument("--teacher", help="dense teacher (default: the base model named in report.json)")
    recover.add_argument("--gradient-checkpointing", action="store_true", help="save activation memory")
    recover.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    recover.add_argument(
        "--save-every", type=int, default=0, help="a resumable adapter checkpoint every N steps (OUTPUT-checkpoints)"
    )
    recover.add_argument("--resume", action="store_true", help="continue from the last adapter checkpoint")
    recover.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    recover.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    recover.add_argument("--device", default="auto", help=DEVICE_HELP)
    recover.add_argument("--device-map", help=DEVICE_MAP_HELP)
    recover.add_argument("--quiet", action="store_true", help="no progress bar")
    recover.set_defaults(func=cmd_recover)

    push = verbs.add_parser("push", help="upload a pruned checkpoint to the Hub with a generated model card")
    push.add_argument("model", help="checkpoint folder written by dms-llm")
    push.add_argument("repo_id", help="user/name on the Hugging Face Hub")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to upload to (created if missing)")
    push.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    push.add_argument(
        "--commit-message", help="message of the upload commit (default: 'Upload NAME (pruned with dms-llm)')"
    )
    push.add_argument("--license", help="licence for the card (default: the base model's)")
    push.set_defaults(func=cmd_push)

    export = verbs.add_parser("export", help="write a checkpoint (either layout) as GGUF for llama.cpp")
    export.add_argument("model", help="model folder: dense, or pruned by dms-llm (uniform or per-layer)")
    export.add_argument("--format", default="gguf", choices=["gguf"], help="output format (gguf)")
    export.add_argument("--outtype", default="f16", help="f32, f16, bf16 or q8_0 (default f16)")
    export.add_argument("--output", "-o", help="the .gguf file (default: MODEL/NAME-OUTTYPE.gguf)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(func=cmd_export)

    recipes = verbs.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=cmd_recipes)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .checkpoint import check_output_file, load_config, load_model
    from .config import EvalConfig
    from .evaluate import evaluate_model, prepare_perplexity_sources, render_evaluation
    from .report import versions

    config = EvalConfig(
        heldout=False,
        ppl=_split(args.ppl) if args.ppl or args.tasks else ["wikitext2"],
        tasks=_split(args.tasks),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        limit=args.limit,
        task_data=args.task_data,
    )
    config.validate()
    output = check_output_file(args.output or _default_eval_output(args.model), overwrite=True, flag="--output")
    load_config(args.model)  # a missing folder or a folder without config fails before anything loads
    for source in config.ppl:
        _check_text_source(source)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    sources = prepare_perplexity_sources(tokenizer, config.ppl)
    result = evaluate_model(model, tokenizer, config, sources, progress=True)
    result.update({"model": args.model, "settings": vars(config), "versions": versions()})
    sys.stdout.write(render_evaluation({Path(args.model.rstrip("/")).name: result}))
    staging = output.with_name(f".{output.name}.tmp")
    staging.write_text(json.dumps(result, indent=2) + "\n")
    staging.replace(output)  # atomic: a reader never sees half a file
    print(f"wrote {output}")
    return 0


def _default_eval_output(model: str) -> Path:
    """MODEL/eval.json beside the weights; ./NAME-eval.json for a Hub name or a read-only folder."""
    import os

    local = Path(model).expanduser()
    # no write bits means read-only even to root (who may write anyway): a shared or served folder
    marked_writable = local.is_dir() and local.stat().st_mode & 0o222
    if marked_writable and os.access(local, os.W_OK | os.X_OK):
        return local / "eval.json"
    return Path(f"{local.resolve().name if local.is_dir() else model.replace('/', '--')}-eval.json")


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    url = push_to_hub(
        args.model,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
        license=args.license,
    )
    print(f"uploaded {args.model} to {args.repo_id}: {url}")
    return 0


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import available_recipes, recipe_model

    for name, path in available_recipes().items():
        header = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:14s} {recipe_model(name) or '':32s} {header}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .gguf_export import describe, export_gguf, fallback_tensors

    out = export_gguf(args.model, args.output, args.outtype, args.overwrite)
    info = describe(out)
    widths = ", ".join(str(n) for n in info["feed_forward_length"])
    print(f"wrote {out} ({info['architecture']}, {info['tensors']} tensors; MLP widths {widths})")
    if fallback := fallback_tensors(args.model, args.outtype):
        print(
            f"note: {len(fallback)} tensors have rows that are not a multiple of 32 and are stored as f16 "
            "(prune with --channel-multiple 32 to quantize them all)"
        )
    return 0


SPREAD = "--device-map auto spreads a model too big for one GPU over all of this machine's GPUs"
# the verbs a launcher's ranks must not each run (only prune splits its work over ranks)
SINGLE_PROCESS_VERBS = {
    cmd_eval: SPREAD,
    cmd_recover: SPREAD,
    cmd_export: "it reads the checkpoint tensor by tensor, on the CPU",
    cmd_push: "one upload",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # argparse keeps the verb parsers here
    if argv and argv[0] in verbs:
        # flags and key=value overrides may be mixed freely after the verb
        args = verbs[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    args.argv = argv
    rank, world = launched_ranks()
    if world > 1 and args.func in SINGLE_PROCESS_VERBS:
        # every rank would run the whole job and race for the same output (torchrun then stops the
        # rest as soon as one fails): refuse on all ranks, say it once
        if rank == 0:
            verb, why = argv[0], SINGLE_PROCESS_VERBS[args.func]
            print(
                f"dms-llm: error: `dms-llm {verb}` runs in one process, but it was launched as {world} "
                f"(torchrun / accelerate launch); run `dms-llm {verb} ...` directly ({why})",
                file=sys.stderr,
            )
        return 2
    try:
        return args.func(args)
    except DMSError as error:
        print(f"dms-llm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = getattr(args, "interrupt_note", "nothing was written")
        print(f"dms-llm: interrupted; {note}", file=sys.stderr)
        return 130
