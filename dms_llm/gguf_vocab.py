"""The vocabulary of a GGUF export, from the folder's own tokenizer files.

SentencePiece (``tokenizer.model``: Llama-2, Mistral, TinyLlama, stories260K) and byte-level BPE
(``tokenizer.json``: Llama-3, Qwen2) vocabularies are read with the ``gguf`` package's helpers,
and special tokens, BOS/EOS flags, merges and the chat template with its ``SpecialVocab``, as
llama.cpp's converter does. A BPE vocabulary also needs llama.cpp's name for its pre-tokenizer,
recognised here from the split pattern in ``tokenizer.json``.

Example:
    >>> add_vocabulary(writer, Path("llama3-dms20"), vocab_size=128256)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DMSError

# the split pattern of each byte-level BPE pre-tokenizer llama.cpp knows, by its name there
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def bpe_pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``."""
    spec = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec])
    patterns = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    for pattern in patterns:
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    if not patterns and any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        return "gpt-2"
    raise DMSError(
        f"the BPE pre-tokenizer in {folder / 'tokenizer.json'} is not one this export knows (Llama-3, Qwen2, "
        "GPT-2); convert this model with llama.cpp's convert_hf_to_gguf.py, which hashes its tokenizer"
    )


def add_vocabulary(writer, folder: Path, vocab_size: int) -> None:
    """Write the folder's vocabulary (padded to ``vocab_size`` rows of the embedding) into ``writer``."""
    import logging

    import gguf
    from gguf.vocab import BpeVocab, SentencePieceVocab

    # SpecialVocab warns about post-processor details llama.cpp does not use
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)

    if (folder / "tokenizer.model").is_file():
        vocab, model, pre, merges, pad_score = SentencePieceVocab(folder), "llama", "default", False, -10000.0
    elif (folder / "tokenizer.json").is_file():
        try:
            vocab = BpeVocab(folder)
        except FileNotFoundError:
            raise DMSError(
                f"{folder / 'tokenizer.json'} is not a byte-level BPE vocabulary and there is no tokenizer.model "
                "(SentencePiece) beside it; copy the base model's tokenizer.model into the folder"
            ) from None
        model, pre, merges, pad_score = "gpt2", bpe_pre_tokenizer(folder), True, 0.0
    else:
        raise DMSError(f"{str(folder)!r} has neither tokenizer.model nor tokenizer.json: nothing to build a vocabulary")
    tokens, scores, kinds = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        kinds.append(kind)
    if len(tokens) > vocab_size:
        raise DMSError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows")
    for index in range(len(tokens), vocab_size):  # embedding rows no token uses
        tokens.append(f"[PAD{index}]".encode())
        scores.append(pad_score)
        kinds.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens)).add_to_gguf(writer)
