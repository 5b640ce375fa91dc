"""Which files make a model: the weights transformers reads, locally and on the Hub.

Some repositories hold their weights twice. Mistral's (Mistral-7B-v0.3, Mistral-Nemo, ...) have the
sharded ``model-*.safetensors`` with their index, which transformers reads, and a
``consolidated.safetensors`` for mistral-inference: a ``*.safetensors`` pattern downloads both
(14.5 GB more at 7B) and counts both against the cache's free space. Like transformers, dms-llm
reads the shards an index names, else ``model.safetensors``; only a folder with neither falls back
to every ``*.safetensors`` in it.

Example:
    >>> folder = download_model("mistralai/Mistral-7B-v0.3")     # doctest: +SKIP
    >>> [f.name for f in weight_files(folder)][:1]               # doctest: +SKIP
    ['model-00001-of-00003.safetensors']
"""

from __future__ import annotations

import json
from pathlib import Path

from .disk_space import check_download_room
from .errors import DMSError
from .hub_access import use_cache_if_offline

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
METADATA_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken")  # config, tokenizer, generation settings


def index_shards(index_file: Path) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` maps its tensors to."""
    try:
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DMSError(f"{str(index_file)!r} is not a safetensors index (no weight_map): {error}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a local model folder, as transformers chooses them."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        return [folder / name for name in index_shards(folder / INDEX)]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DMSError(f"{str(folder)!r} has no safetensors weights (dms-llm never loads pickled .bin files)")
    return files


def hub_model_files(repo_id: str) -> tuple[str, ...]:
    """Download patterns for a Hub model: its metadata and tokenizer, and exactly the weight files
    transformers reads (the index's shards, fetched first: a small JSON file, or ``model.safetensors``).
    """
    from huggingface_hub import hf_hub_download

    try:
        index = Path(hf_hub_download(repo_id, INDEX))
    except Exception:  # no index (one file of weights); offline, gated, missing: the download says so
        return (*METADATA_FILES, SINGLE)
    return (*METADATA_FILES, INDEX, *index_shards(index))


def check_model_download_room(repo_id: str) -> None:
    """Refuse a Hub model whose missing files would not fit in the cache (before any weights load)."""
    check_download_room(repo_id, hub_model_files(repo_id))


def download_model(name_or_path: str) -> Path:
    """The folder itself, or the local snapshot of a Hub model (config, tokenizer, safetensors)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    use_cache_if_offline()  # no network: the cache at once, not a minute of retries per file
    patterns = hub_model_files(name_or_path)
    check_download_room(name_or_path, patterns)
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=list(patterns)))
    except Exception as error:  # offline, gated, missing: one clear line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(first) from None
