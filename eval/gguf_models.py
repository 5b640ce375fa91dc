"""Small random-weight models for the llama.cpp comparison (``eval/gguf_llamacpp.py``).

- a Llama wide enough for k-quants (hidden 512, MLP 1536) with stories260K's SentencePiece vocabulary;
- a Llama-3-style model: GQA, Llama-3.1 rope scaling and a byte-level BPE vocabulary trained here
  on the TinyStories text with Llama-3's split pattern (no Hub access is needed);
- a Qwen2 model (q/k/v biases) with a byte-level BPE vocabulary using Qwen2's split pattern.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
TEXT = SHARED / "text" / "tinystories" / "validation_a.txt"


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def wide_llama(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = work / "wide_random"
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    _save(LlamaForCausalLM(config), AutoTokenizer.from_pretrained(STORIES), folder)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # the base files, byte for byte
        (folder / name).write_bytes((STORIES / name).read_bytes())
    return folder


def bpe_tokenizer(split: str, bos: str | None, eos: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the TinyStories text with ``split`` as pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t in (bos, eos) if t]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXT.read_text().splitlines(), trainer)
    if bos:  # Llama-3 puts BOS in front of every sequence
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, add_bos_token=bool(bos))


def llama3_style(work: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dms_llm.gguf_vocab import LLAMA3_SPLIT

    folder = work / "llama3_random"
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    config = LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, vocab_size=512, max_position_embeddings=1024, rope_parameters=rope, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    tokenizer = bpe_tokenizer(LLAMA3_SPLIT, "<|begin_of_text|>", "<|end_of_text|>")
    return _save(LlamaForCausalLM(config), tokenizer, folder)


def qwen2_style(work: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dms_llm.gguf_vocab import QWEN2_SPLIT

    folder = work / "qwen2_random"
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=0,
        use_sliding_window=False,
    )  # fmt: skip
    tokenizer = bpe_tokenizer(QWEN2_SPLIT, None, "<|endoftext|>")
    return _save(Qwen2ForCausalLM(config), tokenizer, folder)
