"""DMS against the peers' one-shot criteria at equal parameter budgets.

Every method prunes the same model to the same budget, with the same units (KV-group heads, MLP
channels, layers), the same calibration blocks, the same slicing code and the same budget
landing; only the choice of what to keep differs. Reports held-out perplexity on the calibration
source's tail and on WikiText-2, and each method's wall time.

    python eval/benchmark_methods.py            # stories260K + TinyStories, ~5 minutes on 2 CPU cores

Writes eval/results/methods.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT))

from results_io import portable  # noqa: E402 (eval/, beside this script)

from dms_llm import PruneConfig, calibration_blocks, load_text, perplexity, tokenize_text  # noqa: E402
from dms_llm.adapters import get_adapter  # noqa: E402
from dms_llm.baselines import METHODS, one_shot  # noqa: E402
from dms_llm.budget import ParamCounter, resolve_budget  # noqa: E402
from dms_llm.pipeline import masks_for  # noqa: E402
from dms_llm.search_loop import search  # noqa: E402
from dms_llm.slicing import slice_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--calib", default=str(SHARED / "text" / "tinystories" / "validation_a.txt"))
    parser.add_argument("--wikitext", default=str(SHARED / "text" / "wikitext2" / "wiki.test.raw.txt"))
    parser.add_argument("--ratios", default="0.1,0.2,0.3,max", help="comma list; 'max' = largest reachable")
    parser.add_argument("--methods", default="dms," + ",".join(METHODS))
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--recipe", default="stories260k", help="DMS settings (a recipe name or YAML)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "eval" / "results"))
    return parser.parse_args()


def run_dms(model, counter, budget, blocks, config: PruneConfig, seed: int, teacher=None):
    masks = masks_for(model, config)
    try:
        result = search(
            model, masks, counter, budget, blocks, config.search, seed=seed, progress=False, teacher=teacher
        )
    finally:
        masks.remove()
    return result.architecture, result.params


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dense = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    adapter = get_adapter(dense.config)
    counter = ParamCounter.from_model(dense, adapter)
    config = dms_config(args.recipe, args.calib)
    data = calibration_blocks(tokenizer, config.data, seed=args.seed)
    wikitext = tokenize_text(tokenizer, load_text(args.wikitext))
    evaluate = {"heldout": data.heldout, "wikitext2": wikitext}

    def perplexities(model) -> dict[str, float]:
        return {name: perplexity(model, tokens, args.eval_seq_len) for name, tokens in evaluate.items()}

    largest = 1.0 - counter.minimum(False, True, True) / counter.total
    ratios = [largest - 0.001 if r == "max" else float(r) for r in args.ratios.split(",")]
    rows = [{"method": "dense", "ratio": 0.0, "params": counter.total, "seconds": 0.0, **perplexities(dense)}]
    print(f"dense: {rows[0]}")
    for ratio in ratios:
        budget = resolve_budget(counter, ratio=ratio)
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if method == "dms":
                arch, params = run_dms(model, counter, budget, data.calib, config, args.seed)
            else:
                result = one_shot(model, method, counter, budget, data.calib, seed=args.seed, adapter=adapter)
                arch, params = result.architecture, result.params
                if result.compensate is not None:
                    result.compensate(model)
            slice_model(model, arch)
            seconds = time.perf_counter() - start
            assert sum(p.numel() for p in model.parameters()) == params <= budget.target
            row = {
                "method": method,
                "ratio": round(ratio, 4),
                "params": params,
                "seconds": round(seconds, 2),
                **perplexities(model),
                "layers_kept": len(arch.kept_layers),
                "units": arch.unit_counts(),
                "channels": arch.channel_counts(),
            }
            rows.append(row)
            print(
                f"ratio {ratio:.3f} {method:10s} params {params:,} heldout {row['heldout']:.3f} "
                f"wikitext2 {row['wikitext2']:.2f} ({seconds:.1f} s)",
                flush=True,
            )
    write_results(Path(args.out), rows, args, config)


MEASURED_WITH = ["search.mode=structure", "search.loss=task", "data.num_blocks=512"]


def dms_config(recipe: str, calib: str) -> PruneConfig:
    from dms_llm.config import apply_overrides, load_recipe

    # the settings these results were measured with: structure mode on the task loss over 512
    # blocks (the defaults until benchmark_quality.py chose lora, task+kd and 1024 blocks)
    config = apply_overrides(load_recipe(recipe), MEASURED_WITH)
    config.data.calib = calib
    return config.validate()


def write_results(out: Path, rows: list[dict], args, config: PruneConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    meta = {
        "command": "python eval/benchmark_methods.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "model": args.model,
        "calibration": args.calib,
        "eval_seq_len": args.eval_seq_len,
        "dms_settings": config.to_dict(),
    }
    (out / "methods.json").write_text(portable(json.dumps({"meta": meta, "rows": rows}, indent=2)) + "\n")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"})
    dense = rows[0]
    lines = [
        f"Held-out perplexity (TinyStories tail / WikiText-2, {args.eval_seq_len}-token windows) of "
        f"stories260K pruned to the same budget; dense {dense['heldout']:.2f} / {dense['wikitext2']:.1f}. "
        "Lower is better; bold = best at that ratio.",
        "",
        "| ratio | params | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for ratio in ratios:
        cells = {r["method"]: r for r in rows if r["ratio"] == ratio}
        best = min(cells.values(), key=lambda r: r["heldout"])["method"]
        params = max(r["params"] for r in cells.values())
        text = []
        for method in methods:
            r = cells[method]
            cell = f"{r['heldout']:.2f} / {r['wikitext2']:.0f}"
            text.append(f"**{cell}**" if method == best else cell)
        lines.append(f"| {ratio:.3f} | {params:,} | " + " | ".join(text) + " |")
    lines += [
        "",
        "Wall time per method (seconds, mean over ratios): "
        + ", ".join(f"{m} {sum(r['seconds'] for r in rows if r['method'] == m) / len(ratios):.1f}" for m in methods)
        + ".",
        f"Machine: {machine}. Command: `{meta['command'].strip()}`.",
    ]
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    plot(out / "methods.png", rows, methods)
    print("\n".join(lines))


def plot(path: Path, rows: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, title in (
        (axes[0], "heldout", "TinyStories (held-out tail)"),
        (axes[1], "wikitext2", "WikiText-2 test"),
    ):
        for method in methods:
            points = sorted((r["params"], r[metric]) for r in rows if r["method"] == method)
            axis.plot([p / 1e3 for p, _ in points], [v for _, v in points], marker="o", label=method)
        axis.axhline(rows[0][metric], color="gray", linestyle="--", label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("parameters (K)")
        axis.set_ylabel("perplexity")
        axis.set_title(title)
    axes[0].legend()
    fig.suptitle("stories260K: perplexity vs parameters at equal budgets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
