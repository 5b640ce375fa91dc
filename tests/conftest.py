"""Shared fixtures: tiny models of every supported family and the real stories260K checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

# tests never reach a hub: everything is built from configs or read from ../shared/data
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
STORIES = SHARED_DATA / "models" / "stories260K"
TINYSTORIES = SHARED_DATA / "text" / "tinystories" / "validation_a.txt"
WIKITEXT = SHARED_DATA / "text" / "wikitext2" / "wiki.test.raw.txt"

FAMILIES = {
    # name: (config class, model class, extra config)
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 8}),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "llama_bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 4}),
}


def make_tiny(family: str, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny model of one family (fp32, eval mode)."""
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=8,
        vocab_size=128,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-zero biases so that slicing them is really tested
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
    return model


def load_eval_script(name: str):
    """The module of ``eval/<name>.py``, which imports its siblings (results_io) from beside itself.

    >>> load_eval_script("update_readme").BLOCK  # doctest: +SKIP
    """
    import importlib.util
    import sys

    folder = str(ROOT / "eval")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def require_shared() -> None:
    if not STORIES.is_dir():
        pytest.skip(f"real model folder {STORIES} is absent (it comes with the project's shared data)")


@pytest.fixture
def stories():
    """(model, tokenizer) of the real stories260K checkpoint."""
    require_shared()
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    return model, tokenizer


@pytest.fixture
def calib(stories):
    """Calibration blocks (96 x 128 tokens) and the held-out tail of the real TinyStories text."""
    from dms_llm.config import DataConfig
    from dms_llm.data import calibration_blocks

    _, tokenizer = stories
    return calibration_blocks(tokenizer, DataConfig(calib=str(TINYSTORIES), num_blocks=96, seq_len=128), seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
