"""What `dms-llm export` costs on a pruned model of real size: wall time and peak memory.

    python eval/benchmark_export.py                    # the 1B (fp32) and 7B (bf16) pruned shapes, f16 and q8_0
    python eval/benchmark_export.py --models 1b --outtypes q8_0

The pruned checkpoints are those `eval/benchmark_scale.py` writes (random weights with the real
Llama-3.2-1B / Llama-2-7B configs, pruned per layer at ratio 0.2, in ``--work-dir``); a missing one
is made by running that script's stages once (without its search, into a scratch results file).
Each export runs as the user runs it, `python -m dms_llm export FOLDER --outtype T`, in a process of
its own; its peak RSS is the kernel's for that process (``os.wait4``), its time the wall clock.
The GGUF files are deleted after they are measured. Writes eval/results/export.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
LABELS = {"1b": "Llama-3.2-1B shape, float32", "7b": "Llama-2-7B shape, bfloat16"}


def pruned_folder(name: str, work_dir: Path) -> Path:
    """The scale benchmark's pruned checkpoint of ``name``, made first if it is missing."""
    folder = work_dir / f"{name}-pruned"
    if not (folder / "model.safetensors").exists():
        scratch = work_dir / "scale-for-export"  # its stage figures are not this benchmark's
        command = [sys.executable, str(ROOT / "eval" / "benchmark_scale.py"), "--models", name, "--steps", "0"]
        subprocess.run([*command, "--work-dir", str(work_dir), "--out", str(scratch)], check=True)
    return folder


def measured_export(folder: Path, outtype: str, target: Path) -> dict:
    """Run one export as its own process; its seconds, peak RSS and output size."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "dms_llm", "export", str(folder), "--outtype", outtype, "-o", str(target)]
    start = time.perf_counter()
    process = subprocess.Popen([*command, "--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    seconds = time.perf_counter() - start
    output = process.stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed:\n{output}")
    print(output.strip().splitlines()[-1], flush=True)
    size = target.stat().st_size
    target.unlink()  # several GB each: measured, then gone
    peak = usage.ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3), "gguf_gib": size / GIB}


def write(out: Path, rows: list[dict], command: str) -> None:
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows}, indent=2))
    lines = [
        f"`dms-llm export` of the scale benchmark's pruned checkpoints (random weights, real configs, per-layer "
        f"layout at ratio 0.2) on {machine}: each export is its own process; peak RSS includes Python, torch "
        "and the gguf package (about 0.4 GiB).",
        "",
        "| model | checkpoint GiB | GGUF | GGUF GiB | seconds | peak RSS GiB | peak / checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['checkpoint_gib']:.2f} | {r['outtype']} | {r['gguf_gib']:.2f} | {r['seconds']:.1f} "
            f"| {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / r['checkpoint_gib']:.2f} |"
        )
    lines += ["", f"Command: `{command}`.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--outtypes", default="f16,q8_0")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dms-llm-scale")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "export")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        folder = pruned_folder(name, args.work_dir)
        checkpoint = (folder / "model.safetensors").stat().st_size / GIB
        for outtype in args.outtypes.split(","):
            measured = measured_export(folder, outtype, args.work_dir / f"{name}-{outtype}.gguf")
            rows.append({"model": LABELS[name], "checkpoint_gib": checkpoint, "outtype": outtype, **measured})
            print(json.dumps(rows[-1]), flush=True)
    write(args.out, rows, ("python eval/benchmark_export.py " + " ".join(sys.argv[1:])).strip())


if __name__ == "__main__":
    main()
