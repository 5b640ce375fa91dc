"""Export a checkpoint (dense, uniform or per-layer pruned) to GGUF for llama.cpp.

Uniform checkpoints become llama.cpp's ``llama`` architecture. Per-layer ones become ``deci``,
the architecture of NVIDIA's Nemotron-NAS models, which reads ``head_count``, ``head_count_kv``
and ``feed_forward_length`` as per-layer arrays: the layers keep the widths the search gave them
and no other tool is needed to run them. Qwen2 (Llama with q/k/v biases) goes the same way: both
architectures load the biases, while llama.cpp's own ``qwen2`` assumes every query head is there.

The tensors are streamed one at a time from the safetensors files into the file the ``gguf``
package writes (header and tensor table first, then the data), so memory stays at one tensor.
q/k rows are permuted per layer into llama.cpp's rotary layout (as its own converter does), and
the vocabulary comes from the folder's tokenizer files through the ``gguf`` package's helpers.
The file is written beside the destination and renamed into place.

Example:
    >>> export_gguf("llama2-7b-dms20", outtype="q8_0")   # doctest: +SKIP
    PosixPath('llama2-7b-dms20/llama2-7b-dms20-q8_0.gguf')
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_model_folder, check_output_file, corrupt_weights, current_umask
from .disk_space import check_room, disk_errors
from .errors import DMSError
from .gguf_vocab import add_vocabulary
from .output_lock import claim_output
from .tokenizer_files import tokenizer_files_bytes

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    ffn: int


@dataclass(frozen=True)
class ExportPlan:
    """What llama.cpp needs to know about a checkpoint, read from its config."""

    arch: str  # "llama" or "deci"
    config: object
    layers: tuple[LayerShape, ...]
    head_dim: int
    permute_qk: bool

    @property
    def per_layer(self) -> bool:
        return self.arch == "deci"


def plan_export(folder: Path) -> ExportPlan:
    """The architecture and per-layer shapes of a checkpoint folder, or a clear error."""
    from transformers import AutoConfig

    check_model_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    family = config.model_type
    if family not in ("llama", "mistral", "qwen2"):
        raise DMSError(f"GGUF export supports llama, mistral and qwen2 checkpoints, not {family!r}")
    window = getattr(config, "sliding_window", None) if family == "mistral" else None
    if window and window < config.max_position_embeddings:
        raise DMSError(
            f"this Mistral uses sliding-window attention ({config.sliding_window} tokens), which llama.cpp's "
            "llama architecture does not implement; export a model with sliding_window null"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    shapes = (
        getattr(config, "dms_layer_shapes", None)
        or [{"num_key_value_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size}]
        * config.num_hidden_layers
    )
    layers = tuple(
        LayerShape(s["num_key_value_heads"] * group, s["num_key_value_heads"], s["intermediate_size"]) for s in shapes
    )
    uniform = len(set(layers)) == 1 and layers[0] == LayerShape(
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    # Qwen2 is Llama with q/k/v biases, which llama.cpp's llama and deci load too (its own qwen2
    # architecture assumes all query heads, so it cannot hold pruned ones): the same export serves
    return ExportPlan("llama" if uniform else "deci", config, layers, head_dim, permute_qk=True)


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``permute_rows``."""
    return (
        weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]
    load: object  # () -> torch.Tensor, read only when written


def planned_tensors(folder: Path, plan: ExportPlan) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, read lazily: the weights (q/k permuted) and Llama-3's rope factors."""
    import gguf
    from safetensors import SafetensorError, safe_open

    from .model_files import weight_files

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[plan.arch.upper()], len(plan.layers))
    planned = []
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if name is None:
                        raise DMSError(f"{file.name} holds {key!r}, which has no GGUF name for {plan.arch}")
                    shape = tuple(handle.get_slice(key).get_shape())
                    planned.append(PlannedTensor(name, shape, _loader(file, key, plan)))
        except SafetensorError as error:
            raise corrupt_weights(file, error) from None
    factors = _llama3_rope_factors(plan)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(PlannedTensor(name, tuple(factors.shape), lambda: factors))
    return planned


def _loader(file: Path, key: str, plan: ExportPlan):
    def load() -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(key)
        except SafetensorError as error:
            raise corrupt_weights(file, error) from None
        if plan.permute_qk and key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            layer = plan.layers[int(key.split(".layers.")[1].split(".")[0])]
            tensor = permute_rows(tensor, layer.heads if "q_proj" in key else layer.kv_heads)
        return tensor

    return load


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)})


def _llama3_rope_factors(plan: ExportPlan) -> torch.Tensor | None:
    """Llama-3.1's frequency scaling as llama.cpp reads it: one factor per rotary pair."""
    import math

    rope = _rope(plan.config)
    if rope.get("rope_type") != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), plan.head_dim
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def storage_type(tensor: PlannedTensor, outtype: str):
    """The GGML type a tensor is stored in: 1-D tensors stay f32 (as llama.cpp's converter keeps
    them); a q8_0 row must hold whole 32-value blocks, otherwise the tensor falls back to f16."""
    from gguf import GGMLQuantizationType as Q

    if outtype == "f32" or len(tensor.shape) <= 1:
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if tensor.shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def _encode(tensor: torch.Tensor, kind):
    """The bytes (or float array) the GGUF file stores for ``tensor`` in type ``kind``."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.to(torch.float32).numpy()
    if kind == Q.F32:
        return data
    if kind == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, kind)  # bf16 and q8_0: uint8 bytes


def _nbytes(shape: tuple[int, ...], kind) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    count = 1
    for dim in shape:
        count *= dim
    return count // block * size


def _add_hyperparameters(writer, plan: ExportPlan, name: str, outtype: str) -> None:
    import gguf

    config, layers = plan.config, plan.layers

    def per_layer(values: list[int]):
        return values if plan.per_layer else values[0]

    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(per_layer([layer.ffn for layer in layers]))
    writer.add_head_count(per_layer([layer.heads for layer in layers]))
    writer.add_head_count_kv(per_layer([layer.kv_heads for layer in layers]))
    # always explicit: llama.cpp would otherwise divide the width by layer 0's (pruned) head count
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings", config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(int(original))
    elif kind not in ("default", "llama3"):  # llama3 scaling is the rope_freqs tensor
        raise DMSError(f"rope scaling {kind!r} has no GGUF export here; supported: default, linear, yarn, llama3")
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[outtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(
    path: str | os.PathLike, output: str | os.PathLike | None = None, outtype: str = "f16", overwrite: bool = False
) -> Path:
    """Write ``path`` (a model folder) as one GGUF file; returns the file's path.

    ``output`` defaults to ``PATH/NAME-OUTTYPE.gguf``. An existing file is only replaced with
    ``overwrite=True``; the file appears complete or not at all.
    """

    if outtype not in OUTTYPES:
        raise DMSError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    folder = Path(path).expanduser()
    plan = plan_export(folder)
    out = Path(output).expanduser() if output else folder / f"{folder.resolve().name}-{outtype}.gguf"
    check_output_file(out, overwrite)
    tensors = planned_tensors(folder, plan)
    size = sum(_nbytes(t.shape, storage_type(t, outtype)) for t in tensors)  # exact
    # the vocabulary it stores takes less than the tokenizer files it is read from
    check_room(out, size + tokenizer_files_bytes(str(folder)), f"the {outtype} GGUF file")
    with claim_output(out), disk_errors(out, "the GGUF file"):  # one export at a time into this file
        _write(out, folder, plan, tensors, outtype)
    return out


def _write(out: Path, folder: Path, plan: ExportPlan, tensors: list[PlannedTensor], outtype: str) -> None:
    """Stream the tensors into a hidden staging file and rename it over ``out`` when complete."""
    import gguf
    import numpy as np

    kinds = [storage_type(t, outtype) for t in tensors]
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(handle)
    writer = gguf.GGUFWriter(None, plan.arch)
    try:
        _add_hyperparameters(writer, plan, folder.resolve().name, outtype)
        add_vocabulary(writer, folder, plan.config.vocab_size)
        for tensor, kind in zip(tensors, kinds):
            quantized = kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            shape = gguf.quant_shape_to_byte_shape(tensor.shape, kind) if quantized else tensor.shape
            numpy_dtype = (
                np.uint8 if quantized else (np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
            )
            writer.add_tensor_info(tensor.name, shape, numpy_dtype, _nbytes(tensor.shape, kind), raw_dtype=kind)
        writer.write_header_to_file(Path(staging))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, kind in zip(tensors, kinds):  # one tensor in memory at a time
            writer.write_tensor_data(_encode(tensor.load(), kind))
        writer.close()
        os.chmod(staging, 0o666 & ~current_umask())
        os.replace(staging, out)
    except BaseException:
        writer.close()
        Path(staging).unlink(missing_ok=True)
        raise


def fallback_tensors(path: str | os.PathLike, outtype: str) -> list[str]:
    """GGUF names of the tensors that ``outtype`` cannot hold and that are stored as f16 instead."""
    from gguf import GGMLQuantizationType as Q

    folder = Path(path).expanduser()
    tensors = planned_tensors(folder, plan_export(folder))
    return [t.name for t in tensors if outtype == "q8_0" and len(t.shape) > 1 and storage_type(t, outtype) == Q.F16]


def describe(path: str | os.PathLike) -> dict:
    """Architecture and per-layer widths of a GGUF file, read back with ``gguf.GGUFReader``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def values(key: str) -> list[int]:
        field = reader.fields[f"{arch}.{key}"]
        return [int(field.parts[i][0]) for i in field.data]

    return {
        "architecture": arch,
        "head_count": values("attention.head_count"),
        "head_count_kv": values("attention.head_count_kv"),
        "feed_forward_length": values("feed_forward_length"),
        "tensors": len(reader.tensors),
    }
