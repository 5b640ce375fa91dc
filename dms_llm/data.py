"""Text sources -> token streams -> fixed-length blocks.

A source is a local file (``.txt``, ``.jsonl`` with a text field, ``.parquet``) or a named
dataset loaded through ``datasets`` (see ``NAMED_SOURCES``). Rows are joined with the source's
separator and tokenised once, with a single BOS at the start, the way WikiText-2 perplexity is
usually computed. Calibration blocks are non-overlapping windows chosen with a seeded
permutation; the tail of the stream is held out for perplexity.

Example:
    >>> blocks = calibration_blocks(tokenizer, DataConfig(calib="notes.txt", num_blocks=64), seed=0)  # doctest: +SKIP
    >>> blocks.calib.shape                                                                          # doctest: +SKIP
    torch.Size([64, 128])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig
from .errors import DMSError, did_you_mean


@dataclass(frozen=True)
class NamedSource:
    """A dataset on the Hugging Face Hub, with the split names of each role."""

    path: str
    name: str | None = None
    field: str = "text"
    separator: str = "\n\n"
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"), ("test", "test"))
    data_files: tuple[tuple[str, str], ...] = ()
    revision: str | None = None
    instruction: bool = False  # Alpaca-style rows (instruction / input / output)
    eval_rows: int | None = None  # rows read for perplexity (C4: the first 1100, as SparseGPT)
    eval_windows: int | None = None  # windows scored for perplexity (C4: 256)


NAMED_SOURCES: dict[str, NamedSource] = {
    "wikitext2": NamedSource("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "c4": NamedSource(
        "allenai/c4",
        field="text",
        separator=" ",
        eval_rows=1100,
        eval_windows=256,
        splits=(("train", "train"), ("validation", "validation"), ("test", "validation")),
        data_files=(
            ("train", "en/c4-train.00000-of-01024.json.gz"),
            ("validation", "en/c4-validation.00000-of-00008.json.gz"),
        ),
    ),
    # the script-based dataset, read from the Hub's automatic Parquet conversion
    "ptb": NamedSource(
        "ptb-text-only/ptb_text_only",
        "penn_treebank",
        field="sentence",
        separator=" ",
        revision="refs/convert/parquet",
    ),
    "alpaca": NamedSource("yahma/alpaca-cleaned", instruction=True, splits=(("train", "train"),) * 3),
}


def format_instruction(row: dict) -> str:
    """Alpaca-style prompt + response as one training text."""
    prompt = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        prompt += f"### Input:\n{row['input']}\n\n"
    return prompt + f"### Response:\n{row['output']}"


def _rows_text(rows: list[dict], field: str, source: str) -> list[str]:
    if not rows:
        return []
    if field in rows[0]:
        return [str(r.get(field) or "") for r in rows]
    if {"instruction", "output"} <= set(rows[0]):
        return [format_instruction(r) for r in rows]
    raise DMSError(f"{source} has no {field!r} field; set data.text_field." + did_you_mean(field, rows[0]))


TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


def _check_is_text(path: Path) -> None:
    """Binary data saved as .txt (or a legacy code page) is refused, not read as garbage."""
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    if b"\x00" in head:
        raise DMSError(f"{str(path)!r} is not text (it holds binary data); give a UTF-8 .txt, .jsonl or .parquet file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a character cut at the 64 KiB boundary
            raise DMSError(
                f"{str(path)!r} is not UTF-8 text (byte {error.start}); convert it first, "
                f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
            ) from None


def _read_local(path: Path, field: str) -> tuple[list[str], str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES + (".jsonl", ".json"):
        _check_is_text(path)
    if suffix in TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8", errors="replace")], "\n\n"
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        message = f"{path} line {number} is not valid JSON (expected one object per line)"
                        raise DMSError(message) from None
        return _rows_text(rows, field, str(path)), "\n\n"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _rows_text(pq.read_table(path).to_pylist(), field, str(path)), "\n\n"
    raise DMSError(f"unsupported text file {path.name!r}: use .txt, .jsonl or .parquet (.bin data is never read)")


def _read_named(name: str, role: str, max_rows: int | None = None) -> tuple[list[str], str]:
    from .hub_access import use_cache_if_offline

    offline = use_cache_if_offline()  # before importing datasets, which reads the setting once
    import datasets

    source = NAMED_SOURCES[name]
    split = dict(source.splits).get(role, role)
    kwargs = {"revision": source.revision} if source.revision else {}
    if source.data_files:
        kwargs["data_files"] = {split: dict(source.data_files)[split]}
    try:
        rows = datasets.load_dataset(source.path, source.name, split=split, **kwargs)
    except Exception as error:  # network, offline mode, missing split: one clear line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = "the Hub cannot be reached and it is not in the local cache" if offline else first
        raise DMSError(
            f"could not load dataset {name!r} ({source.path}, split {split}): {first}. "
            "Offline? Pass a local .txt/.jsonl/.parquet file instead."
        ) from None
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    records = rows.to_list()
    texts = [format_instruction(r) for r in records] if source.instruction else _rows_text(records, source.field, name)
    return texts, source.separator


def load_text(
    source: str,
    split: str = "train",
    text_field: str = "text",
    max_rows: int | None = None,
    max_chars: int | None = None,
) -> str:
    """The text of a source as one string (rows joined by the source's separator).

    ``max_rows`` keeps the first rows of a named dataset; ``max_chars`` stops adding rows of a named
    dataset once that many characters are in (a C4 shard has ~350K documents; calibration needs a
    few hundred thousand tokens).
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise DMSError(f"text source {source!r} is a folder; give a .txt, .jsonl or .parquet file")
        texts, separator = _read_local(path, text_field)
    elif source in NAMED_SOURCES:
        texts, separator = _read_named(source, split, max_rows)
        if max_chars is not None:
            total = 0
            for count, row in enumerate(texts, 1):
                total += len(row) + len(separator)
                if total >= max_chars:
                    texts = texts[:count]
                    break
    elif any(ch in source for ch in "/\\.") or source.startswith("~"):
        raise DMSError(f"text file {source!r} does not exist")
    else:
        raise DMSError(f"unknown text source {source!r}." + did_you_mean(source, NAMED_SOURCES) + " or a file path")
    text = separator.join(texts)
    if not text.strip():
        raise DMSError(f"text source {source!r} contains no text")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D token stream, with one BOS token at the start when the tokenizer uses one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)


def split_blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows (the remainder is dropped): (num_windows, seq_len)."""
    count = tokens.numel() // seq_len
    return tokens[: count * seq_len].view(count, seq_len)


@dataclass(frozen=True)
class CalibrationData:
    calib: torch.Tensor  # (num_blocks, seq_len) calibration blocks
    heldout: torch.Tensor  # 1-D held-out token stream (the tail of the source)
    source: str
    total_tokens: int


def calibration_blocks(tokenizer, config: DataConfig, seed: int = 0) -> CalibrationData:
    """Seeded calibration blocks from the head of the source and the held-out tail."""
    # a named dataset is read only as far as the blocks need (generously: 12 characters a token)
    needed = math.ceil(config.num_blocks * config.seq_len / (1.0 - config.heldout_fraction))
    text = load_text(config.calib, config.split, config.text_field, max_chars=12 * needed + 10_000)
    tokens = tokenize_text(tokenizer, text)
    heldout_len = int(tokens.numel() * config.heldout_fraction)
    calib_tokens = tokens[: tokens.numel() - heldout_len]
    windows = split_blocks(calib_tokens, config.seq_len)
    if windows.shape[0] == 0:
        raise DMSError(
            f"calibration source {config.calib!r} has {calib_tokens.numel()} tokens, fewer than one block of "
            f"{config.seq_len}; give more text or a smaller --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=generator)[: config.num_blocks]
    return CalibrationData(windows[order], tokens[tokens.numel() - heldout_len :], config.calib, tokens.numel())
