"""Inference speed of a pruned model against the dense one: prefill and decode tokens/s.

    python eval/benchmark_speed.py                       # CPU, a random 190M Llama pruned by 30%
    python eval/benchmark_speed.py --device cuda --model llama2-7b --dtype bfloat16

Both layouts are measured in the same run: ``uniform`` (stock config) and ``per_layer`` (different
heads/channels per layer and a dropped layer). The pruned structures land on the same parameter
budget through dms-llm's slicing; speed depends on shapes only, so random weights suffice.
Target: speedup >= 0.9 x (dense params / pruned params). Writes eval/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT))

from benchmark_overhead import CONFIGS  # noqa: E402
from results_io import portable  # noqa: E402 (eval/, beside this script)

from dms_llm.architecture import Architecture  # noqa: E402
from dms_llm.budget import ParamCounter, resolve_budget  # noqa: E402
from dms_llm.masks import MaskSet  # noqa: E402
from dms_llm.refit import fit_counts  # noqa: E402
from dms_llm.slicing import slice_model  # noqa: E402

CONFIGS = {
    **CONFIGS,
    "mini-190m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}


def pruned_architecture(model, ratio: float, uniform: bool, seed: int) -> Architecture:
    """A structure on the budget: uniform counts, or varied per-layer counts with one layer dropped."""
    masks = MaskSet(model, uniform=uniform)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=ratio)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for groups in masks.importance.values():
            for group in groups:
                group.copy_(torch.rand(group.shape, generator=generator))
        if not uniform:
            masks.keep_ratios["heads"].copy_(
                0.5 + 0.5 * torch.rand(masks.keep_ratios["heads"].shape, generator=generator)
            )
            masks.keep_ratios["channels"].copy_(
                0.4 + 0.6 * torch.rand(masks.keep_ratios["channels"].shape, generator=generator)
            )
    arch = masks.architecture()
    kept = arch.kept_layers if uniform else arch.kept_layers[:-2] + arch.kept_layers[-1:]
    counts = fit_counts(
        counter,
        budget,
        kept,
        masks.counts(arch),
        masks.wants(),
        ["channels", "heads"],
        uniform=uniform,
        allowed_units=masks.allowed_units,
    )
    masks.remove()
    return masks.architecture_for(kept, counts)


@torch.no_grad()
def measure(model, args) -> dict:
    device = args.device
    cuda = device.startswith("cuda")
    prompt = torch.randint(0, model.config.vocab_size, (args.batch_size, args.prompt_len), device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    prefill, decode = [], []
    for repeat in range(args.repeats + 1):
        sync()
        start = time.perf_counter()
        output = model(input_ids=prompt, use_cache=True)
        sync()
        prefill_time = time.perf_counter() - start
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        sync()
        if repeat:  # the first round warms up
            prefill.append(prefill_time)
            decode.append(time.perf_counter() - start)
    return {
        "prefill_tokens_per_s": args.batch_size * args.prompt_len / statistics.median(prefill),
        "decode_tokens_per_s": args.batch_size * args.new_tokens / statistics.median(decode),
    }


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini-190m", choices=[k for k, v in CONFIGS.items() if v])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "eval" / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device(args.device):
        dense = LlamaForCausalLM(LlamaConfig(**CONFIGS[args.model])).to(getattr(torch, args.dtype)).eval()
    rows = [{"model": "dense", "params": sum(p.numel() for p in dense.parameters()), **measure(dense, args)}]
    print(rows[0], flush=True)
    for layout in ("uniform", "per_layer"):
        model = copy.deepcopy(dense)
        arch = pruned_architecture(model, args.ratio, layout == "uniform", seed=0)
        slice_model(model, arch, layout=layout)
        row = {
            "model": layout,
            "params": sum(p.numel() for p in model.parameters()),
            "layers": len(arch.kept_layers),
            "class": type(model).__name__,
            **measure(model, args),
        }
        rows.append(row)
        print(row, flush=True)
        del model
    write(Path(args.out), rows, args)


def write(out: Path, rows: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    dense = rows[0]
    lines = [
        f"Inference speed, {args.model} (random weights) pruned by {args.ratio:.0%} of its parameters; {machine}, "
        f"{args.dtype}, batch {args.batch_size}, prompt {args.prompt_len} tokens, {args.new_tokens} decoded tokens "
        "(greedy, KV cache).",
        "",
        "| model | params | param ratio | prefill tok/s | speedup | decode tok/s | speedup | target (0.9 x ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = dense["params"] / row["params"]
        prefill = row["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
        decode = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row.update({"param_ratio": ratio, "prefill_speedup": prefill, "decode_speedup": decode})
        target = (
            "-"
            if row is dense
            else (f"{0.9 * ratio:.2f}: " + ("met" if min(prefill, decode) >= 0.9 * ratio else "missed"))
        )
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.1f}M | {ratio:.2f} | "
            f"{row['prefill_tokens_per_s']:.0f} | {prefill:.2f} | {row['decode_tokens_per_s']:.1f} | "
            f"{decode:.2f} | {target} |"
        )
    command = "python eval/benchmark_speed.py " + " ".join(sys.argv[1:])
    lines += ["", f"Command: `{command.strip()}`."]
    suffix = "_gpu" if cuda else ""
    (out / f"speed{suffix}.json").write_text(
        portable(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2, default=str)) + "\n"
    )
    (out / f"speed{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
