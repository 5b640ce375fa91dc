"""Load models and save pruned checkpoints: safetensors only, written atomically.

A checkpoint is written into a temporary folder beside the destination and renamed into place
at the end, so an interrupted run never leaves a half-written model where a good one is
expected; an existing destination is only replaced with ``overwrite=True``.

Example:
    >>> save_pruned(model, tokenizer, "out/llama-pruned", report=report.to_dict())   # doctest: +SKIP
    >>> model = load_pruned("out/llama-pruned")                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter
from .errors import DMSError
from .slicing import MODELING_FILE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DMSError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_source(name_or_path: str) -> None:
    """Fail early (before anything heavy) on a missing local folder or a folder with no config."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DMSError(f"{name_or_path!r} is not a model folder: it has no config.json")
    elif _looks_like_path(name_or_path):
        raise DMSError(f"model folder {name_or_path!r} does not exist")


def load_config(name_or_path: str):
    """The transformers config of a local folder or Hub model, with a clear error."""
    from transformers import AutoConfig

    check_model_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise DMSError(f"could not load the config of {name_or_path!r}: {first}") from None


def empty_model(config) -> nn.Module:
    """The model a config describes, on the meta device: exact shapes, no memory, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .modeling_dms_pruned import PRUNED_CLASSES

    with init_empty_weights():
        if getattr(config, "dms_layer_shapes", None):
            return PRUNED_CLASSES[config.model_type](config)
        return AutoModelForCausalLM.from_config(config)


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto", device_map: str | None = None):
    """(model, tokenizer) for pruning: a Llama-family causal LM from a folder or the Hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(name_or_path)
    get_adapter(config)  # unsupported families fail here, before the weights load
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    try:
        if getattr(config, "dms_layer_shapes", None):
            model = load_pruned(name_or_path, dtype=torch_dtype, device_map=device_map)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch_dtype, device_map=device_map, use_safetensors=True
            )
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise DMSError(
            f"could not load {name_or_path!r}: {first} (dms-llm only reads safetensors weights, never pickles)"
        ) from None
    if device_map is None:
        model.to(target)
    model.eval()
    return model, tokenizer


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device_map: str | None = None):
    """Load a checkpoint written by dms-llm (either layout), from safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_dms_pruned import PRUNED_CLASSES

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise DMSError(f"{str(path)!r} is not a model folder: it has no config.json")
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    kwargs = {"dtype": dtype, "device_map": device_map, "use_safetensors": True}
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "dms_layer_shapes", None):
        return PRUNED_CLASSES[config.model_type].from_pretrained(folder, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The destination folder, refused if it exists and ``overwrite`` is off."""
    out = Path(output_dir).expanduser()
    if out.exists() and not overwrite:
        raise DMSError(f"output folder {str(out)!r} already exists; choose another --output-dir or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise DMSError(f"output path {str(out)!r} exists and is not a folder")
    return out


def save_pruned(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    report: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write model (safetensors), tokenizer, report.json and, for per-layer shapes, the modeling file."""
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if getattr(model.config, "dms_layer_shapes", None):
            shutil.copyfile(Path(__file__).with_name(MODELING_FILE), staging / MODELING_FILE)
        if report is not None:
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        pickles = [p.name for p in staging.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickles:
            raise RuntimeError(f"refusing to write pickled files {pickles}")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder over the destination, keeping the old one until it succeeds."""
    if not out.exists():
        staging.rename(out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(backup)
    try:
        staging.rename(out)
    except BaseException:
        backup.rename(out)
        raise
    shutil.rmtree(backup, ignore_errors=True)
