"""What matters in the DMS search: one setting changed at a time, at equal parameter budgets.

    python eval/ablation_search.py            # stories260K + TinyStories, ~8 minutes on 2 CPU cores

Each variant starts from the stories260k recipe, changes one setting, prunes to the same budget
and reports held-out TinyStories perplexity (mean over seeds). Writes eval/results/ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_llm import calibration_blocks, perplexity  # noqa: E402
from dms_llm.budget import ParamCounter, resolve_budget  # noqa: E402
from dms_llm.config import apply_overrides, load_recipe  # noqa: E402
from dms_llm.pipeline import masks_for  # noqa: E402
from dms_llm.search_loop import search  # noqa: E402
from dms_llm.slicing import slice_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

VARIANTS = {
    "recipe (heads+channels+layers, straight-through, w=10)": [],
    "no layer pruning": ["targets=heads,channels"],
    "soft forward (no straight-through)": ["search.mask_forward=soft"],
    "budget weight 3": ["search.budget_weight=3"],
    "budget weight 30": ["search.budget_weight=30"],
    "600 steps": ["search.steps=600"],
    "100 steps": ["search.steps=100"],
    "no refine phase": ["search.refine_fraction=0", "search.decay_fraction=0.8"],
    "layer importance: first-order Taylor": ["search.layer_importance=taylor"],
    "channel temperature 4": ["search.temperature_channels=4"],
    "uniform layout": ["layout=uniform"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--calib", default=str(SHARED / "text" / "tinystories" / "validation_a.txt"))
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results"))
    args = parser.parse_args()

    dense = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # the settings these results were measured with (structure mode, task loss, 512 blocks)
    base = apply_overrides(
        load_recipe("stories260k"), ["search.mode=structure", "search.loss=task", "data.num_blocks=512"]
    )
    base.data.calib = args.calib
    rows = []
    for name, overrides in VARIANTS.items():
        config = apply_overrides(copy.deepcopy(base), overrides).validate()
        for ratio in [float(r) for r in args.ratios.split(",")]:
            values, seconds = [], []
            for seed in [int(s) for s in args.seeds.split(",")]:
                data = calibration_blocks(tokenizer, config.data, seed=seed)
                model = copy.deepcopy(dense)
                masks = masks_for(model, config)
                counter = ParamCounter.from_model(model, masks.adapter)
                budget = resolve_budget(counter, ratio=ratio, targets=config.targets)
                start = time.perf_counter()
                result = search(model, masks, counter, budget, data.calib, config.search, seed=seed, progress=False)
                seconds.append(time.perf_counter() - start)
                masks.remove()
                slice_model(model, result.architecture)
                values.append(perplexity(model, data.heldout, config.eval.seq_len))
            row = {
                "variant": name,
                "overrides": overrides,
                "ratio": ratio,
                "heldout_ppl": values,
                "mean": statistics.mean(values),
                "seconds": round(statistics.mean(seconds), 1),
            }
            rows.append(row)
            print(f"{name:55s} ratio {ratio}: {row['mean']:.2f} {[round(v, 2) for v in values]}", flush=True)
    write(Path(args.out), rows, args)


def write(out: Path, rows: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    (out / "ablation.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    ratios = sorted({r["ratio"] for r in rows})
    lines = [
        f"Held-out TinyStories perplexity (seq 256, mean over seeds {args.seeds}) of stories260K pruned by DMS; "
        "one setting changed at a time from the stories260k recipe. Lower is better.",
        "",
        "| variant | " + " | ".join(f"ratio {r}" for r in ratios) + " | search s |",
        "|---|" + "---|" * (len(ratios) + 1),
    ]
    for name in VARIANTS:
        cells = [next(r for r in rows if r["variant"] == name and r["ratio"] == ratio) for ratio in ratios]
        lines.append(f"| {name} | " + " | ".join(f"{c['mean']:.2f}" for c in cells) + f" | {cells[0]['seconds']} |")
    lines += ["", f"Machine: {machine}. Command: `python eval/ablation_search.py`."]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
