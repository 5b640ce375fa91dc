"""GGUF export: structure read back with gguf.GGUFReader, q/k permutation round trip, errors.

The numbers llama.cpp computes from these files are compared with transformers' by
``eval/gguf_llamacpp.py``; with ``LLAMA_PERPLEXITY`` pointing at a ``llama-perplexity`` binary
the last test here does the same comparison.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STORIES, TINYSTORIES, load_eval_script, require_shared
from safetensors.torch import load_file

from dms_llm.errors import DMSError
from dms_llm.gguf_export import describe, export_gguf, unpermute_rows

gguf = pytest.importorskip("gguf")


def _prune(folder: Path, layout: str) -> Path:
    out = folder / layout
    done = subprocess.run(
        ["dms-llm", "prune", str(STORIES), "--ratio", "0.3", "--layout", layout, "--calib", str(TINYSTORIES),
         "--quiet", "--no-eval", "search.steps=20", "data.num_blocks=32", "-o", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    require_shared()
    folder = tmp_path_factory.mktemp("gguf")
    return {layout: _prune(folder, layout) for layout in ("per_layer", "uniform")}


def _tensors(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


def test_per_layer_checkpoint_becomes_deci_with_per_layer_arrays_and_exact_weights(pruned, tmp_path):
    folder = pruned["per_layer"]
    config = json.loads((folder / "config.json").read_text())
    out = export_gguf(folder, tmp_path / "model.gguf", "f32")
    info = describe(out)
    shapes = config["dms_layer_shapes"]
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    assert info["architecture"] == "deci"
    assert info["head_count_kv"] == [s["num_key_value_heads"] for s in shapes]
    assert info["head_count"] == [s["num_key_value_heads"] * group for s in shapes]
    assert info["feed_forward_length"] == [s["intermediate_size"] for s in shapes]
    assert len(set(info["feed_forward_length"])) > 1  # the layers really differ
    weights, tensors = load_file(str(folder / "model.safetensors")), _tensors(out)
    for index, shape in enumerate(shapes):
        kv = shape["num_key_value_heads"]
        q = torch.from_numpy(np.array(tensors[f"blk.{index}.attn_q.weight"].data))
        k = torch.from_numpy(np.array(tensors[f"blk.{index}.attn_k.weight"].data))
        prefix = f"model.layers.{index}"
        assert torch.equal(unpermute_rows(q, kv * group), weights[f"{prefix}.self_attn.q_proj.weight"])
        assert torch.equal(unpermute_rows(k, kv), weights[f"{prefix}.self_attn.k_proj.weight"])
        assert not torch.equal(q, weights[f"{prefix}.self_attn.q_proj.weight"])  # permuted for llama.cpp's rope
        down = np.array(tensors[f"blk.{index}.ffn_down.weight"].data)
        assert torch.equal(torch.from_numpy(down), weights[f"{prefix}.mlp.down_proj.weight"])
    # tied head: llama.cpp reuses the embedding; the key names the file's own layout
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["deci.attention.key_length"].parts[-1][0]) == config["head_dim"]


def test_uniform_checkpoint_becomes_llama_with_plain_counts(pruned, tmp_path):
    folder = pruned["uniform"]
    config = json.loads((folder / "config.json").read_text())
    info = describe(export_gguf(folder, tmp_path / "model.gguf", "f16"))
    assert info["architecture"] == "llama"
    assert info["feed_forward_length"] == [config["intermediate_size"]]
    assert info["head_count"] == [config["num_attention_heads"]]
    assert info["head_count_kv"] == [config["num_key_value_heads"]]


def test_vocabulary_is_the_sentencepiece_model_of_the_base(pruned, tmp_path):
    import sentencepiece

    out = export_gguf(pruned["per_layer"], tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    assert tokens == [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert int(reader.fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == processor.bos_id()


def test_q8_0_quantizes_whole_blocks_and_stores_the_rest_as_f16(pruned, tmp_path):
    out = export_gguf(pruned["per_layer"], tmp_path / "model.gguf", "q8_0")
    Q = gguf.GGMLQuantizationType
    for tensor in _tensors(out).values():
        row = int(tensor.shape[0])  # GGUF lists the row length first
        if len(tensor.shape) == 1 or tensor.name.startswith("rope_freqs"):
            assert tensor.tensor_type == Q.F32, tensor.name
        else:
            assert tensor.tensor_type == (Q.Q8_0 if row % 32 == 0 else Q.F16), tensor.name


def test_bad_requests_are_one_clear_error_and_leave_no_file(pruned, tmp_path):
    folder = pruned["per_layer"]
    out = export_gguf(folder, tmp_path / "model.gguf", "f32")
    before = out.read_bytes()
    with pytest.raises(DMSError, match="already exists"):
        export_gguf(folder, out, "f32")
    assert out.read_bytes() == before
    with pytest.raises(DMSError, match="unknown --outtype"):
        export_gguf(folder, tmp_path / "other.gguf", "q4_0")
    config = json.loads((folder / "config.json").read_text())
    foreign = tmp_path / "gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(DMSError, match="not 'gpt2'"):
        export_gguf(foreign, tmp_path / "gpt2.gguf")
    assert config and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "model.gguf"]


def test_cli_export_writes_beside_the_model(pruned):
    done = subprocess.run(
        ["dms-llm", "export", str(pruned["per_layer"]), "--outtype", "q8_0"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    written = pruned["per_layer"] / "per_layer-q8_0.gguf"
    assert written.is_file() and f"wrote {written}" in done.stdout
    assert "stored as f16" in done.stdout  # stories260K's widths are not multiples of 32
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not os.environ.get("LLAMA_PERPLEXITY"), reason="set LLAMA_PERPLEXITY to a llama-perplexity binary")
def test_llama_cpp_perplexity_matches_transformers(pruned, tmp_path):
    compare = load_eval_script("gguf_llamacpp").compare
    for folder in pruned.values():
        row = compare(folder, Path(os.environ["LLAMA_PERPLEXITY"]), tmp_path / f"{folder.name}.gguf", "f32")
        assert abs(row["llamacpp"] / row["transformers"] - 1) < 0.005, row


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.size_label", "general.name"):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            strings = field.types[-1] == gguf.GGUFValueType.STRING
            values[key] = [bytes(field.parts[i]).decode() if strings else field.parts[i].tolist() for i in field.data]
        else:
            part = field.parts[-1]
            values[key] = bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()
    return values


@pytest.mark.skipif(
    not os.environ.get("LLAMA_CPP_CONVERTER"), reason="set LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py"
)
def test_llama_cpp_converter_reads_the_base_vocabulary_and_agrees_with_export(pruned, tmp_path):
    import sys

    def convert(folder: Path, out: Path) -> Path:
        command = [sys.executable, os.environ["LLAMA_CPP_CONVERTER"], str(folder), "--outfile", str(out)]
        done = subprocess.run([*command, "--outtype", "f32"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return out

    base = _fields(convert(STORIES, tmp_path / "base.gguf"))
    theirs = convert(pruned["uniform"], tmp_path / "uniform.gguf")
    converted = _fields(theirs)
    vocabulary = [k for k in base if k.startswith("tokenizer.")]
    # the converter builds the base model's vocabulary from the pruned folder
    assert vocabulary and all(converted[k] == base[k] for k in vocabulary)
    ours = export_gguf(pruned["uniform"], tmp_path / "ours.gguf", "f32")
    assert _fields(ours) == converted  # every key llama.cpp's own converter writes, with the same values
    mine, reference = _tensors(ours), _tensors(theirs)
    assert sorted(mine) == sorted(reference)
    for name, tensor in reference.items():
        assert np.array_equal(np.array(mine[name].data), np.array(tensor.data)), name


def test_per_layer_qwen2_keeps_its_biases_permuted_with_their_rows(tmp_path):
    require_shared()
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from dms_llm.architecture import Architecture
    from dms_llm.checkpoint import save_pruned
    from dms_llm.slicing import slice_model

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    kept_units, kept_channels = [[0, 1, 2, 3], [1, 3], [2]], [list(range(96)), list(range(0, 96, 2)), [5, 9, 40]]
    arch = Architecture(3, [0, 1, 2], kept_units, kept_channels, [4, 4, 4], [96, 96, 96])
    slice_model(model, arch, "per_layer")
    folder = save_pruned(model, AutoTokenizer.from_pretrained(STORIES), tmp_path / "qwen2")
    out = export_gguf(folder, tmp_path / "qwen2.gguf", "f32")
    info = describe(out)
    assert info["architecture"] == "deci" and info["head_count_kv"] == [len(u) for u in arch.kept_units]
    tensors, weights = _tensors(out), load_file(str(folder / "model.safetensors"))
    for index, units in enumerate(kept_units):
        for name, heads in (("q", 2 * len(units)), ("k", len(units))):
            stored = torch.from_numpy(np.array(tensors[f"blk.{index}.attn_{name}.bias"].data))
            original = weights[f"model.layers.{index}.self_attn.{name}_proj.bias"]
            assert torch.equal(unpermute_rows(stored, heads), original)
        v = torch.from_numpy(np.array(tensors[f"blk.{index}.attn_v.bias"].data))
        assert torch.equal(v, weights[f"model.layers.{index}.self_attn.v_proj.bias"])  # v is not rotated
