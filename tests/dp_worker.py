"""One rank of a data-parallel DMS search on stories260K (run with torchrun, or alone).

    torchrun --standalone --nproc_per_node 2 tests/dp_worker.py OUT_DIR 1
    python tests/dp_worker.py OUT_DIR 2          # one process, 2 micro-batches per step

Writes OUT_DIR/rank{N}.json with the architecture, keep ratios and importances.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dms_llm.budget import ParamCounter, resolve_budget  # noqa: E402
from dms_llm.config import DataConfig, SearchConfig  # noqa: E402
from dms_llm.data import calibration_blocks  # noqa: E402
from dms_llm.masks import MaskSet  # noqa: E402
from dms_llm.search_loop import search  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(out: Path, grad_accum: int) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(SHARED / "models" / "stories260K").eval()
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K")
    data = calibration_blocks(
        tokenizer, DataConfig(calib=str(SHARED / "text" / "tinystories" / "validation_a.txt"), num_blocks=64), 0
    )
    config = SearchConfig(
        mode="structure",
        steps=32,
        batch_size=4,
        grad_accum=grad_accum,
        layer_score_every=10,
        score_blocks=8,
        save_every=0,
    )
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=0.3)
    result = search(model, masks, counter, budget, data.calib, config, seed=0, accelerator=accelerator, progress=False)
    record = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "architecture": result.architecture.to_dict(),
        "ratios": {kind: ratio.detach().tolist() for kind, ratio in masks.keep_ratios.items()},
        "importance": {kind: [group.tolist() for group in groups] for kind, groups in masks.importance.items()},
        "losses": [h["task_loss"] for h in result.history],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
