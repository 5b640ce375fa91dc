"""What each pipeline stage costs at real model sizes: wall time and peak memory per stage.

    python eval/benchmark_scale.py                        # Llama-3.2-1B shape (fp32) + Llama-2-7B shape (bf16)
    python eval/benchmark_scale.py --models 1b --steps 2   # one model, fewer timed steps
    python eval/benchmark_scale.py --models 1b --malloc-mmap-threshold 1048576 --out eval/results/scale-mmap
    python eval/benchmark_scale.py --device cuda --models 7b,8b --dtype bfloat16   # on a GPU

Random weights with the real configs are written once to ``--work-dir`` (safetensors, like a Hub
checkpoint) by a separate process; every model's stages then run in a fresh process, in the order a
default ``dms-llm prune`` runs them (a stage's peak includes what glibc kept of the earlier stages'
freed memory, as in a real run):

- ``load``: ``dms_llm.load_model`` of the folder;
- ``perplexity``: ``dms_llm.evaluate.perplexity`` of 8 windows of 128 tokens on the model as loaded
  (trainable weights), as ``dms-llm prune`` evaluates the dense model and ``dms-llm eval`` any;
- ``teacher targets``: the dense model's top-64 next-token log-probabilities on the 64 blocks
  (8 no-grad forwards), as the default search takes them once over its calibration blocks before
  its first step; their share of a default search (1024 blocks, over 300 lora steps) is reported;
- ``first scoring`` / ``layer scoring``: ``measure_layer_scores`` at the default settings (the
  first, at step 0, which adds a block-influence pass, and a later one, after the search steps,
  ranked by the last scores); their share of a default search (the first + the later ones, over
  300 steps) is reported;
- ``search step``: steps of the real ``search`` at the default settings (8 blocks x 128 tokens,
  weights frozen), timed between steps; peak = weights + activations;
- ``search step (lora)``: the same steps at the default ``search.mode=lora`` and ``task+kd`` loss
  (LoRA r=8 adapters on every projection train with the keep ratios, distilled from those
  targets; merged into the weights at the end), compared with the structure-mode step's peak;
- ``plain fwd+bwd``: the same batch through the plain model with every weight trainable, as many
  times as the timed search steps (the reference for the search step's time); step times are medians;
- ``landing``: the deterministic fit of the hard masks onto the budget (ratio 0.2);
- ``slicing`` and ``saving``: ``slice_model`` and ``save_pruned``.

Peak memory is the process's peak RSS during the stage (CPU; freed memory is returned to the
system with ``malloc_trim`` and the high-water mark reset through /proc/self/clear_refs before
each stage) or ``torch.cuda.max_memory_allocated`` (GPU). Writes
eval/results/scale.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT.parent / "shared" / "data" / "models" / "stories260K"  # any tokenizer: saving needs one

CONFIGS = {
    "1b": ("Llama-3.2-1B", "float32", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0,
    )),
    "7b": ("Llama-2-7B", "bfloat16", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
    )),
    "8b": ("Llama-3-8B", "bfloat16", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    )),
}  # fmt: skip
GIB = 2**30


# ---- memory probes ------------------------------------------------------------------------
def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    # memory an earlier stage freed but glibc kept would count as this stage's: give it back first
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Stage:
    """Context manager timing one stage and recording its peak memory."""

    def __init__(self, name: str, device: str, record: dict):
        self.name, self.device, self.record = name, device, record

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        reset_peak(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        self.record[self.name] = {"seconds": round(seconds, 3), "peak_gib": round(peak_bytes(self.device) / GIB, 3)}
        print(
            f"  {self.name:14s} {seconds:8.2f} s  peak {self.record[self.name]['peak_gib']:6.2f} GiB",
            file=sys.stderr,
            flush=True,
        )


# ---- the random checkpoint ----------------------------------------------------------------
def make_checkpoint(name: str, folder: Path, device: str) -> None:
    """Random weights (std 0.02, norms 1) with the real config, saved as safetensors."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dms_llm.tokenizer_files import carry_tokenizer_files

    _, dtype, config = CONFIGS[name]
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**config)).to(getattr(torch, dtype))
    model.to_empty(device=device)  # made where it runs: no host copy of GPU weights
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, parameter in model.named_parameters():
            if pname.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.save_pretrained(folder)
    carry_tokenizer_files(tokenizer, folder)  # all its files, as a Hub checkpoint has (tokenizer.model: GGUF)


# ---- the stages ---------------------------------------------------------------------------
def run_stages(name: str, folder: Path, args) -> dict:
    from dms_llm.budget import ParamCounter, resolve_budget
    from dms_llm.checkpoint import load_model, save_pruned
    from dms_llm.config import PruneConfig, SearchConfig
    from dms_llm.evaluate import perplexity
    from dms_llm.layer_scores import ScoreBudget, measure_layer_scores
    from dms_llm.losses import teacher_targets
    from dms_llm.pipeline import masks_for
    from dms_llm.search_loop import search
    from dms_llm.slicing import slice_model
    from dms_llm.structure import land

    device, record = args.device, {}
    with Stage("load", device, record):
        model, tokenizer = load_model(str(folder), dtype=CONFIGS[name][1], device=device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = PruneConfig(ratio=0.2)
    defaults = SearchConfig()
    counter = ParamCounter.from_model(model, masks_for(model, config).adapter)
    budget = resolve_budget(counter, ratio=0.2)
    masks = masks_for(model, config)
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, model.config.vocab_size, (64, config.data.seq_len), generator=generator)
    batch = blocks[: defaults.batch_size].to(device)
    with Stage("perplexity", device, record):  # weights as loaded: trainable, as prune's dense evaluation
        perplexity(model, blocks[: defaults.batch_size].flatten(), config.data.seq_len, defaults.batch_size)
    label, dtype = CONFIGS[name][:2]
    result = {"model": label, "dtype": dtype, "params": counter.total, "weights_gib": weights / GIB}

    if args.steps > 0:
        # in the order of a default prune: the dense targets, the first layer scoring (step 0), the
        # search steps and a later scoring; then the lora steps and, for reference, a plain step
        masks.remove()
        with Stage("teacher targets", device, record):  # the default search's, taken before its first step
            targets = teacher_targets(model, blocks, defaults.distill_topk, batch_size=defaults.batch_size)
        masks = masks_for(model, config)
        score_blocks = blocks[: defaults.score_blocks]
        head = model.get_output_embeddings().weight.numel()
        budget_of_scoring = ScoreBudget.for_search(counter, head, defaults, blocks.shape[1])
        with Stage("first scoring", device, record):  # the first: an extra block-influence pass
            measure_layer_scores(model, masks, score_blocks, budget_of_scoring)  # reads the scores, sets none
        stamps: list[float] = []
        search_config = SearchConfig(
            mode="structure", steps=args.steps + 1, layer_score_every=10**6, refine_fraction=0.0, save_every=0
        )
        with Stage("search", device, record):
            # step 0 also measures the layer scores: the step time is taken from the later steps
            outcome = search(model, masks, counter, budget, blocks, search_config, progress=False,
                             on_step=lambda step, _: stamps.append(time.perf_counter()))  # fmt: skip
        step_seconds = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        record["search step"] = {"seconds": round(step_seconds, 3), "peak_gib": record.pop("search")["peak_gib"]}
        with Stage("layer scoring", device, record):  # a later scoring: ranked by the last scores
            measure_layer_scores(model, masks, score_blocks, budget_of_scoring)
        masks.remove()
        lora_masks, lora_stamps = masks_for(model, config), []
        # taylor layer scores: the skip-loss scoring of step 0 is measured above, not again here;
        # mode lora with the teacher: loss auto is task+kd, the default search
        lora_config = dataclasses.replace(search_config, mode="lora", layer_importance="taylor")
        with Stage("search (lora)", device, record):
            search(model, lora_masks, counter, budget, blocks, lora_config, progress=False, teacher=targets,
                   on_step=lambda step, _: lora_stamps.append(time.perf_counter()))  # fmt: skip
        del targets
        lora_masks.remove()
        plain_seconds = []
        with Stage("plain fwd+bwd", device, record):
            model.requires_grad_(True)
            model.train()
            for _ in range(args.steps):  # as many as the timed search steps: one sample is too noisy
                start = time.perf_counter()
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)
                plain_seconds.append(time.perf_counter() - start)
        record["plain fwd+bwd"]["seconds"] = round(statistics.median(plain_seconds), 3)
        model.requires_grad_(False).eval()
        masks = masks_for(model, config)
        lora_seconds = statistics.median(b - a for a, b in zip(lora_stamps, lora_stamps[1:]))
        record["search step (lora)"] = {
            "seconds": round(lora_seconds, 3),
            "peak_gib": record.pop("search (lora)")["peak_gib"],
        }
        result["lora_over_structure_peak"] = (
            record["search step (lora)"]["peak_gib"] / record["search step"]["peak_gib"]
        )
        arch = outcome.architecture
        # a default search scores layers every layer_score_every steps until the refine phase
        refine_start = round((1 - defaults.refine_fraction) * defaults.steps)
        scorings = len(range(0, refine_start, defaults.layer_score_every))
        scoring_seconds = record["first scoring"]["seconds"] + (scorings - 1) * record["layer scoring"]["seconds"]
        result["layer_scoring_share"] = scoring_seconds / (defaults.steps * step_seconds)
        # the default calibration set through the dense model once, against the default search's steps
        teacher_seconds = record["teacher targets"]["seconds"] * PruneConfig().data.num_blocks / blocks.shape[0]
        result["teacher_share"] = teacher_seconds / (defaults.steps * lora_seconds)
        result["step_over_plain"] = step_seconds / record["plain fwd+bwd"]["seconds"]
        result["search_activations_gib"] = record["search step"]["peak_gib"] - record["load"]["peak_gib"]
    else:
        arch = masks.architecture()
    with torch.no_grad():  # landing from masks that keep a random 90%: a real amount of work
        for groups in masks.importance.values():
            for group in groups:
                group.copy_(torch.rand(group.shape, generator=generator))
        for ratio in masks.keep_ratios.values():
            ratio.fill_(0.9)
    with Stage("landing", device, record):
        landed = land(masks, counter, budget, masks.architecture())
    arch = landed if args.steps == 0 else arch
    masks.remove()
    with Stage("slicing", device, record):
        slice_model(model, arch, "per_layer")
    out = args.work_dir / f"{name}-pruned"
    shutil.rmtree(out, ignore_errors=True)  # the last run's (dms-llm only overwrites its own reports)
    with Stage("saving", device, record):
        save_pruned(model, tokenizer, out)
    for stage in record.values():
        stage["peak_over_weights"] = round(stage["peak_gib"] * GIB / weights, 3)
    result["stages"] = record
    return result


# ---- orchestration ------------------------------------------------------------------------
def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def write_results(results: list[dict], args, command: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(args.device), "command": command, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"Cost of each stage on {payload['machine']}; random weights with the real configs, ratio 0.2, "
        "search at the defaults (8 x 128 tokens a step, weights frozen). Peak: peak RSS of the stage "
        "(GPU: max allocated), and that over the weight bytes."
        + (
            f" glibc's mmap threshold fixed at {args.malloc_mmap_threshold:,} bytes (MALLOC_MMAP_THRESHOLD_)."
            if args.malloc_mmap_threshold is not None
            else ""
        ),
        "",
        "| model | stage | seconds | peak GiB | peak / weights |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for stage, v in r["stages"].items():
            label = f"{r['model']} ({r['dtype']}, {r['params'] / 1e9:.2f}B, {r['weights_gib']:.2f} GiB)"
            cells = f"{v['seconds']:.3f} | {v['peak_gib']:.2f} | {v['peak_over_weights']:.2f}"
            lines.append(f"| {label} | {stage} | {cells} |")
    lines.append("")
    for r in results:
        if "step_over_plain" in r:
            lines.append(
                f"- {r['model']}: search step / plain forward+backward = {r['step_over_plain']:.2f}; "
                f"layer scoring = {100 * r['layer_scoring_share']:.1f}% of a default 300-step search; "
                f"activations of a search step (8 x 128 tokens): {r['search_activations_gib']:.2f} GiB "
                "over the loaded weights."
            )
        if "lora_over_structure_peak" in r:
            lines.append(
                f"- {r['model']}: the default search step (`search.mode=lora`, LoRA r=8 on every projection, "
                f"task+kd loss) peaks at {r['lora_over_structure_peak']:.2f}x the structure-mode search step; "
                f"its teacher targets (the dense model once over the default 1,024 calibration blocks) cost "
                f"{100 * r['teacher_share']:.1f}% of a default 300-step search on top."
            )
    lines += ["", f"Command: `{command}`.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--steps", type=int, default=3, help="timed search (and plain) steps, medians (0: no search)")
    parser.add_argument("--search-models", default="1b", help="models whose search stages run (CPU: the 7B is slow)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dms-llm-scale")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "scale")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="run the stages with glibc's MALLOC_MMAP_THRESHOLD_ fixed at this many bytes (CPU memory tip)",
    )
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: make:NAME or run:NAME
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.stage:
        action, name = args.stage.split(":")
        folder = args.work_dir / name
        if action == "make":
            make_checkpoint(name, folder, args.device)
        else:
            args.steps = args.steps if name in args.search_models.split(",") else 0
            print(json.dumps(run_stages(name, folder, args)), flush=True)
        return
    command = "python eval/benchmark_scale.py " + " ".join(sys.argv[1:])
    results = []
    for name in args.models.split(","):
        base = [sys.executable, __file__, *sys.argv[1:]]
        if not (args.work_dir / name / "config.json").exists():
            subprocess.run([*base, "--stage", f"make:{name}"], check=True)
        print(f"{CONFIGS[name][0]}:", flush=True)
        env = dict(os.environ)
        if args.malloc_mmap_threshold is not None:  # read by glibc at the process's start
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        done = subprocess.run([*base, "--stage", f"run:{name}"], check=True, stdout=subprocess.PIPE, text=True, env=env)
        lines = done.stdout.strip().splitlines()
        print("\n".join(lines[:-1]))
        results.append(json.loads(lines[-1]))
    write_results(results, args, command.strip())


if __name__ == "__main__":
    main()
