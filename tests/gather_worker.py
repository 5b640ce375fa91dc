"""One rank gathering a sharded model's pruned weights (run with torchrun, 2 CPU ranks).

    torchrun --standalone --nproc_per_node 2 tests/gather_worker.py MODEL_DIR OUT_DIR

Loads MODEL_DIR sharded over the ranks, gathers it sliced to an architecture that drops layer 1
and prunes units and channels elsewhere, and records every gather (``DTensor.full_tensor``) and
every layer slice in order. Rank 0 also saves the gathered model's weights and those of the same
checkpoint loaded whole and sliced by ``slice_model``. Writes OUT_DIR/rank{N}.json.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import dms_llm.slicing as slicing  # noqa: E402
from dms_llm.adapters import get_adapter  # noqa: E402
from dms_llm.architecture import Architecture  # noqa: E402
from dms_llm.checkpoint import load_model  # noqa: E402
from dms_llm.launch import make_accelerator  # noqa: E402
from dms_llm.sharding import gather_pruned, is_sharded, load_sharded  # noqa: E402


def pruned_architecture(units: list[int], channels: list[int]) -> Architecture:
    """Layer 1 dropped; every other layer keeps all units but the first and every other channel."""
    dense = Architecture.dense(units, channels)
    return Architecture(
        num_layers=dense.num_layers,
        kept_layers=[i for i in dense.kept_layers if i != 1],
        kept_units=[list(range(1, u)) for u in units],
        kept_channels=[list(range(0, c, 2)) for c in channels],
        original_units=units,
        original_channels=channels,
    )


def main(model_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator("cpu")
    model = load_sharded(str(model_dir), torch.float32, torch.device("cpu"))
    assert is_sharded(model)
    geometry = get_adapter(model.config).geometry(model)
    arch = pruned_architecture(list(geometry.units), list(geometry.channels))
    events: list[list] = []
    full_tensor, slice_layer = DTensor.full_tensor, slicing.slice_layer

    def gathering(self, *args, **kwargs):
        events.append(["gather", self.numel()])
        return full_tensor(self, *args, **kwargs)

    def slicing_layer(layer, index, *args, **kwargs):
        events.append(["slice", index])
        return slice_layer(layer, index, *args, **kwargs)

    DTensor.full_tensor, slicing.slice_layer = gathering, slicing_layer
    try:
        pruned = gather_pruned(model, arch)
    finally:
        DTensor.full_tensor, slicing.slice_layer = full_tensor, slice_layer
    record = {"rank": accelerator.process_index, "events": events, "architecture": arch.to_dict()}
    if pruned is not None:
        whole, _ = load_model(str(model_dir), dtype="float32", device="cpu")
        record["dense_layer_numel"] = [sum(p.numel() for p in layer.parameters()) for layer in whole.model.layers]
        slicing.slice_model(whole, arch)
        save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(out / "gathered.safetensors"))
        save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, str(out / "sliced.safetensors"))
        record["config"] = {"gathered": pruned.config.to_dict(), "sliced": whole.config.to_dict()}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
