"""Memory per rank of a multi-process prune: data-parallel ranks against sharded ones (``--shard``).

    python eval/benchmark_sharded.py                      # Llama-3.2-1B shape (fp32), 2 CPU ranks, lora and structure
    python eval/benchmark_sharded.py --modes auto         # the default lora search only (the committed results)
    python eval/benchmark_sharded.py --ranks 8 --device cuda --model 8b   # on a GPU node

Runs the real command line, ``torchrun --nproc_per_node N -m dms_llm prune MODEL ...``, with
data-parallel ranks and with ``--shard``, for each search mode of ``--modes`` (the default lora
search on task+kd, and structure mode on the task loss), on a random-weight checkpoint with a real
config (written by ``eval/benchmark_scale.py`` into the same work folder if absent). Each run does a
short search at the default per-step batch (8 blocks of 128 tokens over all ranks; kd's dense
targets taken on the 16 calibration blocks it uses) with the first layer scoring, the layer guard,
landing, slicing and saving, and reports:

- wall time of the whole command;
- each rank's peak RSS, polled every 0.2 s: the main rank's includes gathering the pruned model
  on its host at the end (each kept layer sliced as it arrives, to save it), the other ranks' is
  the search alone;
- the weight bytes one rank held during the search (from the report) over the model's weights.

Writes eval/results/sharded.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT.parent / "shared" / "data" / "text" / "tinystories" / "validation_a.txt"
LABELS = {"1b": "Llama-3.2-1B (float32)", "7b": "Llama-2-7B (bfloat16)", "8b": "Llama-3-8B (bfloat16)"}
GIB = 2**30


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_prune(folder: Path, out: Path, args, shard: bool, mode: str) -> dict:
    """One ``torchrun`` prune in a fresh process tree; its time, largest rank RSS and report."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        str(args.ranks),
        "-m",
        "dms_llm",
        "prune",
        str(folder),
        "--ratio",
        "0.2",
        "--calib",
        str(CALIB),
        "--quiet",
        "--no-eval",
        "--overwrite",
        "-o",
        str(out),
        "--device",
        args.device,
        f"search.steps={args.steps}",
        f"search.batch_size={8 // args.ranks}",
        "search.save_every=0",
        "data.num_blocks=16",  # the blocks the steps and layer scoring use: a short dense-target pass
        "--mode",
        mode,
        *(["--shard"] if shard else []),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.mmap_threshold:  # see --mmap-threshold: RSS then follows the memory the ranks hold
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the ranks
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
        peaks = poll_rank_peaks(launcher)
        log.seek(0)
        stderr = log.read()
    seconds = time.perf_counter() - started
    if launcher.returncode != 0:
        raise SystemExit(f"prune failed ({'sharded' if shard else 'data-parallel'}, {mode}):\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    search = report["settings"]["search"]
    return {
        "mode": f"{search['mode']}, {search['loss']}",
        "seconds": round(seconds, 1),
        # the main rank also gathers the pruned model on its host at the end; the others never do
        "main_rank_peak_gib": round(max(peaks) / GIB, 2),
        "other_rank_peak_gib": round(min(peaks) / GIB, 2),
        "rank_weight_gib": round((report["search"]["rank_weight_bytes"] or weight_bytes(folder)) / GIB, 2),
        "architecture": report["architecture"],
        "params_after": report["params"]["after"],
        "pruned_gib": round(weight_bytes(folder) * report["params"]["after"] / report["params"]["before"] / GIB, 2),
    }


def poll_rank_peaks(launcher: subprocess.Popen, interval: float = 0.2) -> list[int]:
    """Peak RSS of every rank the launcher started (its descendants running ``-m dms_llm``), until it exits."""
    import psutil

    peaks: dict[int, int] = {}
    root = psutil.Process(launcher.pid)
    while launcher.poll() is None:
        try:
            for child in root.children(recursive=True):
                try:
                    if "dms_llm" in child.cmdline():
                        peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        time.sleep(interval)
    return sorted(peaks.values()) or [0]


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b", choices=sorted(LABELS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dms-llm-scale")
    parser.add_argument("--modes", default="auto,structure", help="search modes to run (auto: the default, lora)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=4 << 20,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks (0: glibc's default). A sharded rank allocates and "
        "frees every layer's gathered weights at each forward and backward; with glibc's default (a threshold "
        "that rises to 32 MiB) the freed blocks stay in the heap and RSS overstates what the rank holds",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "sharded")
    args = parser.parse_args()
    folder = args.work_dir / args.model
    if not (folder / "config.json").exists():
        make = [sys.executable, str(ROOT / "eval" / "benchmark_scale.py"), "--work-dir", str(args.work_dir)]
        subprocess.run([*make, "--stage", f"make:{args.model}"], check=True)
    weights = weight_bytes(folder)
    runs, same = {}, {}
    for mode in args.modes.split(","):
        for ranks, shard in (("data-parallel", False), ("sharded (--shard)", True)):
            label, started = f"{ranks}, --mode {mode}", time.perf_counter()
            out = args.work_dir / f"{args.model}-{'sharded' if shard else 'dp'}"
            runs[label] = run_prune(folder, out, args, shard, mode)
            print(f"{label}: {json.dumps({k: v for k, v in runs[label].items() if k != 'architecture'})}", flush=True)
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        both = [run["architecture"] for key, run in runs.items() if key.endswith(f"--mode {mode}")]
        same[mode] = both[0] == both[1]
    write_results(args, weights, runs, same, "python eval/benchmark_sharded.py " + " ".join(sys.argv[1:]))


def write_results(args, weights: int, runs: dict, same: dict, command: str) -> None:
    """eval/results/sharded.{json,md} (or --out) from the runs of ``main``."""
    payload = {
        "machine": machine(args.device),
        "malloc_mmap_threshold": args.mmap_threshold or None,
        "model": LABELS[args.model],
        "weights_gib": round(weights / GIB, 2),
        "ranks": args.ranks,
        "steps": args.steps,
        "same_architecture": same,
        "runs": {k: {key: v for key, v in run.items() if key != "architecture"} for k, run in runs.items()},
        "command": command.strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"`dms-llm prune --ratio 0.2` under `torchrun --nproc_per_node {args.ranks}` on {payload['machine']}: "
        f"{payload['model']}, random weights, {payload['weights_gib']} GiB; {args.steps} search steps of 8 x 128 "
        "tokens over all ranks, first layer scoring, layer guard, landing, slicing and saving, no evaluation. "
        + (
            f"The ranks run with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} (blocks of that size or more are "
            "returned to the system when freed, so peak RSS follows what a rank holds; with glibc's default, "
            "the gathered layers a sharded rank frees stay in its heap)."
            if args.mmap_threshold
            else "glibc's default allocator settings."
        ),
        "",
        "| ranks | search (mode, loss) | wall s | weights a rank holds (GiB) | held / weights "
        "| peak RSS, rank 1 (GiB) | peak RSS, main rank (GiB) | pruned weights (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, run in payload["runs"].items():
        held = run["rank_weight_gib"] / payload["weights_gib"]
        lines.append(
            f"| {label.split(',')[0]} | {run['mode']} | {run['seconds']} | {run['rank_weight_gib']} | {held:.2f} | "
            f"{run['other_rank_peak_gib']} | {run['main_rank_peak_gib']} | {run['pruned_gib']} |"
        )
    agree = ", ".join(f"--mode {mode}: {value}" for mode, value in same.items())
    lines += [
        "",
        f"Same architecture data-parallel and sharded ({agree}). Rank 1's peak is the search (its share of the "
        "weights, the replicated embedding and head, lora mode's adapters with their AdamW states, activations); "
        "the main rank's adds the pruned model, gathered on its host layer by layer (each kept layer sliced as it "
        "arrives, a dropped one never gathered) to save it. Weights a rank holds: its "
        "shards and the replicated tensors (the model's own weights, not the adapters).",
        "",
        f"Command: `{payload['command']}`.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
