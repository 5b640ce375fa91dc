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
from .config_compat import add_legacy_keys
from .disk_space import disk_errors, nearest_existing
from .errors import DMSError
from .hub_access import use_cache_if_offline
from .model_files import download_model, weight_files
from .slicing import MODELING_FILE
from .tokenizer_files import carry_tokenizer_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DMSError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DMSError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DMSError(f"--device {device}: there are only {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_source(name_or_path: str) -> None:
    """Fail early (before anything heavy) on a missing local folder or a folder with no config."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DMSError(f"{name_or_path!r} is not a model folder: it has no config.json")
    elif looks_like_path(name_or_path):
        raise DMSError(f"model folder {name_or_path!r} does not exist")


def check_model_folder(path: str | os.PathLike) -> Path:
    """A local model folder that exists and has a config.json, or a clear error."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DMSError(f"model folder {str(path)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise DMSError(f"{str(path)!r} is not a model folder: it has no config.json")
    return folder


def corrupt_weights(file: Path, error: Exception) -> DMSError:
    """The one-line error for a safetensors file that cannot be read."""
    return DMSError(f"could not read {file}: {error} (a truncated or corrupt safetensors file?)")


def load_config(name_or_path: str):
    """The transformers config of a local folder or Hub model, with a clear error."""
    from transformers import AutoConfig

    check_model_source(name_or_path)
    offline = not Path(name_or_path).expanduser().exists() and use_cache_if_offline()
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        if offline:
            raise DMSError(
                f"{name_or_path!r} is not a local folder nor in the local Hugging Face cache, and the Hub "
                "cannot be reached (offline); give the path of a downloaded model folder"
            ) from None
        first = str(error).strip().splitlines()[0]
        raise DMSError(f"could not load the config of {name_or_path!r}: {first}") from None


def empty_model(config) -> nn.Module:
    """The model a config describes, on the meta device: exact shapes, no memory, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .modeling_dms_pruned import PRUNED_CLASSES

    with init_empty_weights():
        if getattr(config, "dms_layer_shapes", None):
            model = PRUNED_CLASSES[config.model_type](config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head is the embedding: counted once, as in the loaded model
    return model


def load_model(
    name_or_path: str, dtype: str = "auto", device: str = "auto", device_map: str | None = None, shard: bool = False
):
    """(model, tokenizer) for pruning: a Llama-family causal LM from a folder or the Hub.

    The weights go straight to ``device`` (or to the GPUs of ``device_map``), never through a
    full host copy. ``shard=True`` (in a multi-process run) splits the decoder layers over the
    ranks, each reading only its own rows (see ``sharding``).
    """
    from transformers import AutoTokenizer

    config = load_config(name_or_path)
    get_adapter(config)  # unsupported families fail here, before the weights load
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if device_map is None:  # (with a device map, Accelerate places the layers and offloads the rest)
        _check_weights_fit(name_or_path, config, torch_dtype, target, shard)
    try:
        if shard:
            from .sharding import load_sharded

            model = load_sharded(name_or_path, torch_dtype, target)
        else:
            model = load_causal_lm(name_or_path, torch_dtype, target, device_map)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise DMSError(
            f"could not load {name_or_path!r}: {first} (dms-llm only reads safetensors weights, never pickles)"
        ) from None
    return model, tokenizer


def _check_weights_fit(name_or_path: str, config, dtype: torch.dtype, device: torch.device, shard: bool) -> None:
    """This process's weights must fit on ``device`` now: refused before the download and the read.
    Other local ranks may be loading already, so only this process's copy is counted here (``prune``
    counts all of them before the ranks join)."""
    from .memory_room import check_weight_memory, weight_bytes

    model = empty_model(config)
    if shard:
        from .launch import launched_ranks
        from .plan import largest_shard_bytes

        layers = get_adapter(config).decoder_layers(model)
        needed = largest_shard_bytes(model, layers, launched_ranks()[1], dtype.itemsize)
    else:
        needed = weight_bytes(model, dtype)
    what = f"the weights of {name_or_path!r}" + (" (this rank's rows)" if shard else "")
    check_weight_memory(needed, device, dtype, what, copies=1)


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device_map: str | None = None):
    """Load a checkpoint written by dms-llm (either layout), from safetensors only."""
    folder = check_model_folder(path)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    return load_causal_lm(str(folder), dtype, "cpu", device_map)


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None, device, device_map: str | None = None) -> nn.Module:
    """A dense or dms-llm-pruned causal LM, in eval mode.

    Without ``device_map`` every tensor is read into memory of its own (``pread``, not a file
    mapping) and placed on ``device`` one at a time: host memory never holds more than one
    tensor beyond the model, and a tensor that slicing later replaces is really freed (the pages
    of a memory-mapped checkpoint stay resident until the whole file is unmapped).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .modeling_dms_pruned import PRUNED_CLASSES

    folder = download_model(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    pruned = bool(getattr(config, "dms_layer_shapes", None))
    if device_map is None:
        model = empty_model(config)
        if _read_weights(model, weight_files(folder), dtype, torch.device(device)):
            model.config._name_or_path = str(name_or_path)
            if dtype is not None:
                model.config.dtype = dtype
            if (folder / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(folder)
            return model.eval()
        device_map = {"": str(device)}  # keys this reader does not know: let transformers map them
    loader = PRUNED_CLASSES[config.model_type] if pruned else AutoModelForCausalLM
    model = loader.from_pretrained(folder, dtype=dtype, device_map=device_map, use_safetensors=True)
    return model.eval()


def _read_weights(model: nn.Module, files: list[Path], dtype: torch.dtype | None, device: torch.device) -> bool:
    """Fill a meta-device ``model`` from safetensors files; False if the keys do not match its own."""
    from safetensors import SafetensorError, safe_open

    expected = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu", backend="pread") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if key not in expected:
                        return False
                    tensor = handle.get_tensor(key)
                    cast = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
                    state[key] = tensor.to(device=device, dtype=cast)
                    del tensor
    except SafetensorError as error:
        raise corrupt_weights(file, error) from None
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied lm_head is not stored: it becomes the embedding again
    model.to(device)  # buffers (rotary frequencies) were built on the host; the weights are there already
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The destination folder, checked before any work: it must be creatable, and an existing one is
    only replaced with ``overwrite`` and only if dms-llm wrote it (it holds ``report.json``)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not overwrite:
        raise DMSError(f"output folder {str(out)!r} already exists; choose another --output-dir or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise DMSError(f"output path {str(out)!r} exists and is not a folder")
    if out.exists() and (out.resolve() == Path.cwd().resolve() or out.resolve() in Path.cwd().resolve().parents):
        raise DMSError(f"refusing to replace {str(out)!r}: it is the current folder or holds it; choose another")
    if out.exists() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise DMSError(
            f"--overwrite only replaces folders written by dms-llm, and {str(out)!r} has no report.json; "
            "remove it yourself or choose another --output-dir"
        )
    check_creatable(out)
    return out


def check_creatable(out: Path) -> None:
    """``out`` can be created: its nearest existing parent is a writable folder."""
    parent = nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise DMSError(f"cannot create {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DMSError(f"cannot create {str(out)!r}: {str(parent)!r} is not writable")


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "-o") -> Path:
    """A destination file, checked before any work: creatable, and replaced only with ``overwrite``."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise DMSError(f"{str(out)!r} is a folder; give {flag} a file name")
    if out.exists() and not overwrite:
        raise DMSError(f"{str(out)!r} already exists; choose another {flag} or pass --overwrite")
    check_creatable(out)
    if out.exists() and not os.access(out, os.W_OK):
        raise DMSError(f"cannot replace {str(out)!r}: it is not writable")
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
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private; the checkpoint is for others too
    try:
        with disk_errors(out, "the checkpoint"):
            _write_checkpoint(model, tokenizer, staging, report, extra_files)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_checkpoint(model: nn.Module, tokenizer, staging: Path, report: dict | None, extra_files) -> None:
    """Every file of a checkpoint into ``staging``."""
    model.save_pretrained(staging)
    add_legacy_keys(staging)  # transformers 4.x would load it without its RoPE settings
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
        carry_tokenizer_files(tokenizer, staging)
    if getattr(model.config, "dms_layer_shapes", None):
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), staging / MODELING_FILE)
    # report.json marks the folder as dms-llm's: --overwrite replaces no other folder
    (staging / "report.json").write_text(json.dumps(report or _minimal_report(), indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    pickles = [p.name for p in staging.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        raise RuntimeError(f"refusing to write pickled files {pickles}")
    files_follow_umask(staging)


def _minimal_report() -> dict:
    from . import __version__

    return {"written_by": f"dms-llm {__version__}"}


def files_follow_umask(folder: Path) -> None:
    """Give the files in ``folder`` the mode the umask asks for: safetensors (0.8) writes its files
    private (0600), and on a shared GPU server the weights must be as readable as the rest."""
    mode = 0o666 & ~current_umask()
    for file in Path(folder).iterdir():
        if file.is_file():
            os.chmod(file, mode)


def current_umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    current = os.umask(0)
    os.umask(current)
    return current


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
