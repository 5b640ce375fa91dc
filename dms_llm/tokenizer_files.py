"""The tokenizer's own files, which every checkpoint dms-llm writes carries byte for byte.

transformers 5 re-saves only some of them (no ``tokenizer.model``), and llama.cpp's converter then
silently builds a different vocabulary from what is left; the disk checks count them too.

Example:
    >>> carry_tokenizer_files(tokenizer, Path("out/llama-pruned"))   # doctest: +SKIP
    ['tokenizer.model', 'tokenizer.json', 'tokenizer_config.json']
"""

from __future__ import annotations

import shutil
from pathlib import Path

# the files a tokenizer is made of, in any of the families dms-llm reads
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.tiktoken",
)


def tokenizer_source(tokenizer) -> Path | None:
    """The folder the tokenizer was loaded from (a local folder, or the cached Hub snapshot)."""
    return tokenizer_folder(str(getattr(tokenizer, "name_or_path", "") or ""))


def tokenizer_files_bytes(name_or_path: str) -> int:
    """Bytes of a model's own tokenizer files (what every output carries), 0 when not at hand."""
    folder = tokenizer_folder(name_or_path)
    return sum((folder / name).stat().st_size for name in TOKENIZER_FILES if (folder / name).is_file()) if folder else 0


def tokenizer_folder(name: str) -> Path | None:
    """The local folder, or the cached Hub snapshot, holding ``name``'s tokenizer files."""
    if not name:
        return None
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=list(TOKENIZER_FILES), local_files_only=True))
    except Exception:  # not a Hub name, or not cached: the re-saved files are all there is
        return None


def carry_tokenizer_files(tokenizer, folder: Path) -> list[str]:
    """Copy the tokenizer's original files into ``folder`` (over the re-saved ones); returns their names."""
    source = tokenizer_source(tokenizer)
    if source is None or source.resolve() == Path(folder).resolve():
        return []
    carried = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in carried:
        shutil.copyfile(source / name, Path(folder) / name)
    return carried
