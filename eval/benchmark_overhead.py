"""Cost of one DMS search step against the same model's plain training step: time and peak memory.

    python eval/benchmark_overhead.py                          # CPU: stories260K and a 60M random Llama
    python eval/benchmark_overhead.py --device cuda --models llama2-7b,llama3-8b --seq-len 2048 \
        --dtype bfloat16 --gradient-checkpointing             # GPU: full-size random 7B/8B configs

Phases, each measured in a fresh process (so peak memory is its own):
- ``forward``: plain forward pass, no gradients;
- ``plain``: plain forward + backward with every weight trainable (a standard training step, no
  optimizer);
- ``dms``: one full structure-mode search step: mask refresh, masked forward + backward with frozen
  weights, importance update, keep-ratio Adam step;
- ``dms-dropped``: the same step once the search has dropped a quarter of the layers (their masks are
  0 but still learn): a dropped layer's block runs its forward only, since no gradient reaches it.
  Its steps alternate with steps whose dropped blocks back-propagate their zeros
  (``MaskSet.skip_dropped_backward = False``, what the search did before), in the same process so
  that both see the same machine: the two medians say what the cut saves (its peak is of both).
Reports median step time, tokens/s and peak memory (CUDA: max allocated; CPU: peak RSS). Writes
eval/results/overhead.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"

CONFIGS = {
    "stories260K": None,  # the real checkpoint
    "mini-60m": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}


PHASES = ("forward", "plain", "dms", "dms-dropped")


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if CONFIGS[name] is None:
        return AutoModelForCausalLM.from_pretrained(SHARED / "models" / name, dtype=dtype).to(device)
    config = LlamaConfig(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device(device):  # random weights made on the device itself (no 13 GB host copy)
        return LlamaForCausalLM(config).to(dtype)


def run_phase(args) -> dict:
    """One phase in this process; returns its timings and peak memory."""
    from dms_llm.activation_checkpointing import set_activation_checkpointing
    from dms_llm.budget import ParamCounter, budget_penalty, resolve_budget
    from dms_llm.masks import MaskSet

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.device, dtype)
    if args.gradient_checkpointing:
        set_activation_checkpointing(model, True)
        model.train()
    else:
        model.eval()
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=args.device)
    masks = counter = optimizer = budget = None
    if args.phase.startswith("dms"):
        model.requires_grad_(False)
        masks = MaskSet(model)
        counter = ParamCounter.from_model(model, masks.adapter)
        budget = resolve_budget(counter, ratio=0.2)
        learned = masks.parameters()
        if args.phase != "dms":  # a quarter of the layers dropped, their (fixed) ratio still differentiable
            layers = masks.geometry.num_layers
            masks.importance["layers"][0].copy_(torch.arange(layers, 0, -1, dtype=torch.float32))
            masks.keep_ratios["layers"].data.fill_((layers - layers // 4) / layers)
            learned = [p for kind, p in masks.keep_ratios.items() if kind != "layers"]
        optimizer = torch.optim.Adam(learned, lr=0.02)
    elif args.phase == "plain":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)

    def step() -> None:
        if args.phase == "forward":
            with torch.no_grad():
                model(input_ids=batch, use_cache=False)
            return
        if args.phase == "plain":
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
            return
        masks.refresh()
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss.float()
        loss = loss + budget_penalty(masks.param_count(counter), budget.target, 10.0).float()
        loss.backward()
        masks.update_importance()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masks.clamp_()
        masks.deactivate()

    cuda = args.device.startswith("cuda")
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, full_times = [], []
    for index in range(args.steps * (2 if args.phase == "dms-dropped" else 1)):
        cut = index % 2 == 0 or args.phase != "dms-dropped"
        if masks is not None:
            masks.skip_dropped_backward = cut
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        (times if cut else full_times).append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    mask_state = 0
    if masks is not None:
        mask_state = sum(p.numel() * 4 * 3 for p in masks.parameters())  # ratio + Adam moments
        mask_state += sum(g.numel() * 4 for groups in masks.importance.values() for g in groups)
    median = statistics.median(times)
    return {
        "model": args.model,
        "phase": args.phase,
        "median_s": median,
        "median_full_s": statistics.median(full_times) if full_times else None,
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "peak_bytes": peak,
        "weight_bytes": weights,
        "mask_state_bytes": mask_state,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories260K,mini-60m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results"))
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # child process: one measurement, printed as JSON
        print(json.dumps(run_phase(args)))
        return
    rows = []
    for model in args.models.split(","):
        for phase in PHASES:
            command = [
                sys.executable,
                __file__,
                "--phase",
                phase,
                "--model",
                model,
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--seq-len",
                str(args.seq_len),
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            if args.gradient_checkpointing:
                command.append("--gradient-checkpointing")
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{model:12s} {phase:8s} {row['median_s'] * 1000:9.1f} ms/step {row['tokens_per_s']:10.0f} tok/s "
                f"peak {row['peak_bytes'] / 2**30:6.2f} GiB",
                flush=True,
            )
    write(Path(args.out), rows, args)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def dropped_cell(row: dict) -> str:
    """Interleaved steps of one process: the saving is measured on the same machine state."""
    cut, full = row["median_s"], row["median_full_s"]
    return f"{cut * 1e3:.1f} / {full * 1e3:.1f} ({1 - cut / full:.0%})"


def write(out: Path, rows: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else "_gpu"
    meta = {
        "machine": machine(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "command": "python eval/benchmark_overhead.py " + " ".join(sys.argv[1:]),
    }
    (out / f"overhead{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    memory = "peak RSS of the process" if args.device == "cpu" else "max CUDA memory allocated"
    lines = [
        f"One DMS structure-mode search step vs the same model's plain step ({meta['machine']}; {args.dtype}, "
        f"batch {args.batch_size} x {args.seq_len} tokens, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}). Memory: {memory}.",
        "",
        "| model | params | forward ms | plain fwd+bwd ms | DMS step ms | DMS / plain | peak plain | peak DMS | "
        "weights | mask state | 1/4 of layers dropped: DMS step ms, dropped blocks cut / back-propagated (saved) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        phase = {r["phase"]: r for r in rows if r["model"] == model}
        ratio = phase["dms"]["median_s"] / phase["plain"]["median_s"]
        lines.append(
            f"| {model} | {phase['dms']['params'] / 1e6:.1f}M | {phase['forward']['median_s'] * 1e3:.1f} | "
            f"{phase['plain']['median_s'] * 1e3:.1f} | {phase['dms']['median_s'] * 1e3:.1f} | {ratio:.2f} | "
            f"{phase['plain']['peak_bytes'] / 2**30:.2f} GiB | {phase['dms']['peak_bytes'] / 2**30:.2f} GiB | "
            f"{phase['dms']['weight_bytes'] / 2**30:.2f} GiB | {phase['dms']['mask_state_bytes'] / 2**10:.1f} KiB | "
            f"{dropped_cell(phase['dms-dropped'])} |"
        )
    lines += ["", f"Command: `{meta['command'].strip()}`."]
    (out / f"overhead{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
