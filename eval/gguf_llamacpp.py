"""Run exported checkpoints in llama.cpp itself and compare its perplexity with transformers'.

Build llama.cpp's tools from the sources the ``llama-cpp-python`` sdist vendors (2 cores: ~15 min;
LLAMA_DIR is any scratch folder):

    pip download --no-deps --no-binary :all: llama-cpp-python -d $LLAMA_DIR
    tar xzf $LLAMA_DIR/llama_cpp_python-*.tar.gz -C $LLAMA_DIR
    cmake -S $LLAMA_DIR/llama_cpp_python-*/vendor/llama.cpp -B $LLAMA_DIR/build -DCMAKE_BUILD_TYPE=Release \\
          -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF
    cmake --build $LLAMA_DIR/build -j 2 --target llama-perplexity llama-quantize

then:

    python eval/gguf_llamacpp.py --bin $LLAMA_DIR/build/bin

It prunes stories260K (ratio 0.3, default search) per layer with ``--channel-multiple`` 1, 8 and
32 and uniform, exports dense and pruned folders with ``dms-llm export``, and scores each with
``llama-perplexity`` and with transformers on the same text under the same protocol: 256-token
chunks, the first token of each replaced by BOS, the last 127 predictions of each chunk scored
(llama-perplexity's own protocol). q8_0 exports and ``llama-quantize`` Q4_K_M files are run too,
and the held-out perplexity each prune reports gives the quality cost of alignment.
Writes eval/results/gguf.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf_models  # noqa: E402  (beside this script)
from results_io import portable  # noqa: E402 (eval/, beside this script)

SHARED = ROOT.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
CALIB = SHARED / "text" / "tinystories" / "validation_a.txt"
CHUNK = 256


def eval_text(work: Path, chars: int = 60_000) -> Path:
    """The held-out tail of the TinyStories file (the calibration uses its head)."""
    text = CALIB.read_text()
    path = work / "heldout.txt"
    path.write_text(text[-chars:])
    return path


def transformers_ppl(folder: Path, text_file: Path, chunks: int, add_bos: bool) -> float:
    """Perplexity under llama-perplexity's protocol, computed with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tokenizer(text_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if add_bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    count = min(chunks, ids.numel() // CHUNK)
    nll, scored = 0.0, 0
    with torch.no_grad():
        for index in range(count):
            chunk = ids[index * CHUNK : (index + 1) * CHUNK].clone()
            if add_bos:  # llama-perplexity puts BOS first in every chunk
                chunk[0] = tokenizer.bos_token_id
            logits = model(chunk[None]).logits[0].float()
            first = CHUNK // 2
            logp = torch.log_softmax(logits[first : CHUNK - 1], dim=-1)
            nll -= logp.gather(1, chunk[first + 1 :, None]).sum().item()
            scored += CHUNK - 1 - first
    return math.exp(nll / scored)


def llamacpp_ppl(binary: Path, gguf_file: Path, text_file: Path, chunks: int) -> float:
    done = subprocess.run(
        [str(binary), "-m", str(gguf_file), "-f", str(text_file), "-c", str(CHUNK), "-b", str(CHUNK),
         "--chunks", str(chunks), "-t", str(os.cpu_count() or 1)],
        capture_output=True, text=True,
    )  # fmt: skip
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"llama-perplexity failed on {gguf_file}:\n{(done.stdout + done.stderr)[-2000:]}")
    return float(found.group(1))


def quantize(binary: Path, source: Path, target: Path, kind: str) -> dict:
    """``llama-quantize`` SOURCE TARGET KIND; which tensors fell back to another type."""
    done = subprocess.run([str(binary), str(source), str(target), kind], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed on {source}:\n{(done.stdout + done.stderr)[-2000:]}")
    fallbacks = re.findall(r"(\S+\.weight).*?fall(?:ing)? ?back", done.stdout + done.stderr, flags=re.IGNORECASE)
    return {"fallback_tensors": sorted(set(fallbacks))}


def compare(folder: Path, perplexity: Path, gguf_file: Path, outtype: str, chunks: int = 40) -> dict:
    """Export ``folder`` and score it in llama.cpp and in transformers on the held-out text."""
    import gguf

    from dms_llm.gguf_export import describe, export_gguf

    export_gguf(folder, gguf_file, outtype, overwrite=True)
    text = eval_text(gguf_file.parent)
    fields = gguf.GGUFReader(str(gguf_file)).fields
    flag = fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(flag.parts[-1][0]) if flag else bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    return {
        "model": folder.name,
        "outtype": outtype,
        "architecture": describe(gguf_file)["architecture"],
        "llamacpp": llamacpp_ppl(perplexity, gguf_file, text, chunks),
        "transformers": transformers_ppl(folder, text, chunks, add_bos),
    }


def prune(out: Path, *extra: str, model: Path = STORIES) -> Path:
    """A fresh prune every run (never a folder left by an earlier run, made by older code)."""
    subprocess.run(
        [sys.executable, "-m", "dms_llm", "prune", str(model), "--ratio", "0.3", "--calib", str(CALIB),
         "--quiet", "-o", str(out), "--overwrite", *extra],
        check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def alignment_cost(folders: dict[str, Path]) -> list[dict]:
    """Held-out perplexity (from each prune's report) of the per-layer prunes by channel multiple."""
    rows = []
    for label, folder in folders.items():
        if not (folder / "report.json").is_file():
            continue
        report = json.loads((folder / "report.json").read_text())
        shapes = json.loads((folder / "config.json").read_text()).get("dms_layer_shapes") or []
        rows.append({
            "label": label,
            "channel_multiple": report["settings"].get("channel_multiple", 1),
            "params": report["params"]["after"],
            "mlp_widths": [s["intermediate_size"] for s in shapes],
            "heldout_ppl": report["perplexity"]["pruned"],
            "dense_ppl": report["perplexity"]["dense"],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, required=True, help="folder with llama-perplexity and llama-quantize")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dms-llm-gguf")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "gguf")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    perplexity, quantizer = args.bin / "llama-perplexity", args.bin / "llama-quantize"
    folders = {
        "stories260K dense": STORIES,
        "per-layer, ratio 0.3": prune(args.work_dir / "per_layer"),
        "per-layer, ratio 0.3, M=8": prune(args.work_dir / "per_layer_m8", "--channel-multiple", "8"),
        "per-layer, ratio 0.3, M=32": prune(args.work_dir / "per_layer_m32", "--channel-multiple", "32"),
        "uniform, ratio 0.3": prune(args.work_dir / "uniform", "--layout", "uniform"),
        "random hidden 512 / MLP 1536, per-layer, ratio 0.3, M=256": prune(
            args.work_dir / "wide_m256", "--channel-multiple", "256", model=gguf_models.wide_llama(args.work_dir)
        ),
        "random Llama-3-style (GQA, llama3 rope, BPE) dense": gguf_models.llama3_style(args.work_dir),
        "random Llama-3-style, per-layer, ratio 0.3": prune(
            args.work_dir / "llama3_per_layer", model=gguf_models.llama3_style(args.work_dir)
        ),
        "random Qwen2 (q/k/v biases, BPE) dense": gguf_models.qwen2_style(args.work_dir),
        "random Qwen2, uniform, ratio 0.3": prune(
            args.work_dir / "qwen2_uniform", "--layout", "uniform", model=gguf_models.qwen2_style(args.work_dir)
        ),
        "random Qwen2, per-layer, ratio 0.3": prune(
            args.work_dir / "qwen2_per_layer", model=gguf_models.qwen2_style(args.work_dir)
        ),
    }
    rows = []
    for label, folder in folders.items():
        for outtype in ("f32", "q8_0"):
            row = compare(folder, perplexity, args.work_dir / f"{folder.name}-{outtype}.gguf", outtype, args.chunks)
            row["label"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
        source = args.work_dir / f"{folder.name}-f32.gguf"
        target = args.work_dir / f"{folder.name}-Q4_K_M.gguf"
        row = {"label": label, "outtype": "Q4_K_M (llama-quantize)", **quantize(quantizer, source, target, "Q4_K_M")}
        row["llamacpp"] = llamacpp_ppl(perplexity, target, eval_text(args.work_dir), args.chunks)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, alignment_cost({k: v for k, v in folders.items() if k.startswith("per-layer")}), args)


def write(rows: list[dict], alignment: list[dict], args) -> None:
    command = "python eval/gguf_llamacpp.py --bin BUILD/bin"  # BUILD: where llama.cpp was built
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "rows": rows, "alignment": alignment}
    args.out.with_suffix(".json").write_text(portable(json.dumps(payload, indent=2)) + "\n")
    lines = [
        "Checkpoints exported with `dms-llm export` and run in llama.cpp (built from the llama-cpp-python sdist's "
        f"vendored tree) against transformers on the same text: {args.chunks} chunks of {CHUNK} tokens of the "
        "TinyStories held-out tail, BOS first where the tokenizer adds one, the last 127 predictions of each "
        "scored. Random-weight models have a perplexity near their vocabulary size (512); they check the "
        "numerics. Last column: tensors `llama-quantize` had to store in another type than Q4_K_M (of them "
        "MLP tensors); a row needs whole 256-value blocks.",
        "",
        "| model | GGUF | arch | llama.cpp ppl | transformers ppl | difference | tensors Q4_K_M could not hold (MLP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reference = row.get("transformers")
        diff = f"{100 * (row['llamacpp'] / reference - 1):+.2f}%" if reference else "-"
        fallback = "-"
        if "fallback_tensors" in row:
            names = row["fallback_tensors"]
            mlp = sum(1 for name in names if ".ffn_" in name)
            fallback = f"{len(names)} ({mlp})"
        lines.append(
            f"| {row['label']} | {row['outtype']} | {row.get('architecture', '-')} | {row['llamacpp']:.3f} | "
            f"{'-' if reference is None else f'{reference:.3f}'} | {diff} | {fallback} |"
        )
    lines += [
        "",
        "Quality cost of aligned MLP widths (`--channel-multiple M`, stories260K per layer, ratio 0.3, seed 0; "
        "held-out perplexity of the TinyStories tail at 128-token windows, from each prune's report):",
        "",
        f"| M | parameters | MLP widths | held-out ppl (dense {alignment[0]['dense_ppl']:.3f}) |" if alignment else "",
        "|---|---|---|---|",
    ]
    for row in alignment:
        widths = ", ".join(str(w) for w in row["mlp_widths"])
        lines.append(f"| {row['channel_multiple']} | {row['params']:,} | {widths} | {row['heldout_ppl']:.3f} |")
    lines += ["", f"Command: `{command}`.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
