"""Recovery with LoRA: DMS + LoRA against the best one-shot criterion + LoRA, same LoRA budget.

    OMP_NUM_THREADS=1 python eval/benchmark_recovery.py   # stories260K + TinyStories, ~15 minutes

(The committed results ran on one thread. Another thread count sums in another order, which moves a
300-step search's trajectory: the figures then differ by a few percent, not in their ranking.)

Each structure prunes stories260K to the same parameter budget and is then recovered with the
same LoRA run (rank, steps, data, learning rate), with and without KL distillation from the dense
model. ``dms-joint`` is DMS in joint mode: the weights train during the search too (distilled from
the dense model), so that row has the search's steps of extra weight training. Reports held-out
TinyStories perplexity (the file's tail, never trained on) and WikiText-2.
Writes eval/results/recovery.{json,md}.
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

from benchmark_methods import dms_config, run_dms  # noqa: E402
from results_io import portable  # noqa: E402 (eval/, beside this script)

from dms_llm import calibration_blocks, load_text, perplexity, tokenize_text  # noqa: E402
from dms_llm.adapters import get_adapter  # noqa: E402
from dms_llm.baselines import one_shot  # noqa: E402
from dms_llm.budget import ParamCounter, resolve_budget  # noqa: E402
from dms_llm.config import RecoverConfig  # noqa: E402
from dms_llm.losses import teacher_targets  # noqa: E402
from dms_llm.recover import recover  # noqa: E402
from dms_llm.slicing import slice_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--calib", default=str(SHARED / "text" / "tinystories" / "validation_a.txt"))
    parser.add_argument("--wikitext", default=str(SHARED / "text" / "wikitext2" / "wiki.test.raw.txt"))
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--baseline", default="flap", help="the one-shot criterion to compare with")
    parser.add_argument("--joint-weight-lr", type=float, default=1e-3, help="weight learning rate of dms-joint")
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--out", default=str(ROOT / "eval" / "results"))
    args = parser.parse_args()

    dense = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    adapter = get_adapter(dense.config)
    counter = ParamCounter.from_model(dense, adapter)
    config = dms_config("stories260k", args.calib)
    data = calibration_blocks(tokenizer, config.data, seed=0)  # head: calibration and LoRA text; tail: held out
    wikitext = tokenize_text(tokenizer, load_text(args.wikitext))
    seq_len = config.eval.seq_len

    def scores(model) -> dict:
        return {"heldout": perplexity(model, data.heldout, seq_len), "wikitext2": perplexity(model, wikitext, seq_len)}

    lora = RecoverConfig(
        method="lora",
        data=args.calib,
        steps=args.lora_steps,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lr=args.lora_lr,
        seq_len=128,
        batch_size=8,
        heldout_fraction=0.1,
        num_blocks=config.data.num_blocks,
    )
    # the dense model's top-k targets on the calibration blocks: the teacher of every KL run
    targets = teacher_targets(dense, data.calib, lora.distill_topk)
    rows = [{"structure": "dense", "ratio": 0.0, "stage": "dense", "params": counter.total, **scores(dense)}]
    print(rows[0], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        budget = resolve_budget(counter, ratio=ratio)
        for structure in ("dms", "dms-joint", args.baseline):
            model = copy.deepcopy(dense)
            if structure == "dms":
                arch, params = run_dms(model, counter, budget, data.calib, config, seed=0)
            elif structure == "dms-joint":
                joint = copy.deepcopy(config)
                joint.search.mode, joint.search.weight_lr = "joint", args.joint_weight_lr
                arch, params = run_dms(model, counter, budget, data.calib, joint, seed=0, teacher=targets)
            else:
                result = one_shot(model, structure, counter, budget, data.calib, adapter=adapter)
                arch, params = result.architecture, result.params
            slice_model(model, arch)
            pruned = {"structure": structure, "ratio": ratio, "params": params}
            rows.append({**pruned, "stage": "pruned", **scores(model)})
            print(rows[-1], flush=True)
            for distill in (False, True):
                settings = copy.deepcopy(lora)
                settings.distill = distill
                start = time.perf_counter()
                recovered, _ = recover(
                    copy.deepcopy(model),
                    tokenizer,
                    settings,
                    teacher=targets if distill else None,
                    progress=False,
                    data=data,
                )
                stage = "LoRA + KL" if distill else "LoRA"
                rows.append(
                    {**pruned, "stage": stage, "seconds": round(time.perf_counter() - start, 1), **scores(recovered)}
                )
                print(rows[-1], flush=True)
    write(Path(args.out), rows, args, lora)


def write(out: Path, rows: list[dict], args, lora: RecoverConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    machine = f"{platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"
    command = "python eval/benchmark_recovery.py " + " ".join(sys.argv[1:])
    (out / "recovery.json").write_text(
        portable(json.dumps({"machine": machine, "command": command, "lora": vars(lora), "rows": rows}, indent=2))
        + "\n"
    )
    dense = rows[0]
    lines = [
        f"stories260K: held-out TinyStories / WikiText-2 perplexity (seq 256); dense {dense['heldout']:.2f} / "
        f"{dense['wikitext2']:.1f}. Every recovery: LoRA r={lora.lora_r} on all projections, {lora.steps} steps "
        f"of 8 x 128 tokens of the calibration text, lr {lora.lr}; 'LoRA + KL' adds distillation from the dense "
        "model. Lower is better.",
        "",
        "| ratio | structure | params | pruned | + LoRA | + LoRA + KL |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in sorted({r["ratio"] for r in rows if r["ratio"]}):
        for structure in dict.fromkeys(r["structure"] for r in rows if r["ratio"] == ratio):
            stage = {r["stage"]: r for r in rows if r["ratio"] == ratio and r["structure"] == structure}
            cells = [
                f"{stage[s]['heldout']:.2f} / {stage[s]['wikitext2']:.0f}" for s in ("pruned", "LoRA", "LoRA + KL")
            ]
            lines.append(f"| {ratio} | {structure} | {stage['pruned']['params']:,} | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {machine}. Command: `{command.strip()}`."]
    (out / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
