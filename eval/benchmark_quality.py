"""Quality in and out of the calibration domain: DMS's losses against the peers, as pruned and after
the same recovery, over seeds.

stories260K calibrated on TinyStories (`validation_a.txt`: its head is the calibration text, its
held-out tail the in-domain test), WikiText-2 test out of domain; ratios 0.2 / 0.3 / 0.5, seeds 0-2
(the seed picks the calibration blocks and the search's randomness). Every row goes through
``dms_llm.prune`` with ``PruneConfig()`` defaults plus the row's settings, so "DMS" here is what the
CLI runs. Column (b) is the same recovery for every method: LoRA r=8 on all projections, KL
distillation from the dense model, on the calibration text. Wall time and peak RSS per prune.

Out of domain, two measures: perplexity on WikiText-2, and KL(dense || pruned) per token on the first
``--kl-windows`` of those windows, with the pruned model's prediction entropy in the JSON.
stories260K knows only children's stories: on WikiText its dense predictions are overconfident
(entropy ~2.3 nats against a log-perplexity of ~4.8), so a model that predicts more flatly gets a
lower WikiText perplexity without being closer to the model it was pruned from. The KL measures
that closeness directly (exact: the whole 512-token vocabulary).

    python eval/benchmark_quality.py                      # all 15 rows x 3 ratios x 3 seeds: ~95 core-minutes
    python eval/benchmark_quality.py --seeds 0 --ratios 0.3 --rows "dms structure task,flap"   # a quick look
    python eval/benchmark_quality.py --set data.num_blocks=256 ...    # a setting added to every row

The seeds and rows are independent, so they may run as separate processes and be merged. This is
how the committed results were made on 2 cores, two one-thread processes at a time (so the
per-prune seconds are those of one thread), about 45 minutes in all; each process also prints
every finished unit as a JSON line:

    for s in 0 1; do python eval/benchmark_quality.py --seeds $s --threads 1 --out /tmp/q$s & done; wait
    A="dms default (lora task+kd),dms structure task,dms structure kd,dms structure task+kd,dms lora task"
    A="$A,dms lora kd,dms joint task"                 # the first 7 rows; the other 7 in the second process
    B="dms joint kd,dms joint task+kd,dms joint kd (lr 1e-3),dms joint task+kd (lr 1e-3),flap,taylor,shortgpt"
    python eval/benchmark_quality.py --seeds 2 --threads 1 --rows "$A" --out /tmp/q2a &
    python eval/benchmark_quality.py --seeds 2 --threads 1 --rows "$B" --out /tmp/q2b; wait
    python eval/benchmark_quality.py --merge /tmp/q0.json /tmp/q1.json /tmp/q2a.json /tmp/q2b.json

The minitron row came later and was run alone, then merged with the table above (~6 minutes):

    python eval/benchmark_quality.py --seeds 0,1 --threads 1 --rows minitron --out /tmp/qm01 &
    python eval/benchmark_quality.py --seeds 2 --threads 1 --rows minitron --out /tmp/qm2; wait
    python eval/benchmark_quality.py --merge eval/results/quality.json /tmp/qm01.json /tmp/qm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import portable  # noqa: E402 (eval/, beside this script)

from dms_llm.config import DataConfig, PruneConfig, RecoverConfig, apply_overrides  # noqa: E402
from dms_llm.data import calibration_blocks, load_text, split_blocks, tokenize_text  # noqa: E402
from dms_llm.evaluate import kl_to_reference, perplexity  # noqa: E402
from dms_llm.losses import teacher_targets  # noqa: E402
from dms_llm.pipeline import prune  # noqa: E402
from dms_llm.recover import recover, recovery_teacher  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
ROWS = {  # label -> key=value settings on top of PruneConfig()
    "dms default (lora task+kd)": [],
    "dms structure task": ["search.mode=structure", "search.loss=task"],
    "dms structure kd": ["search.mode=structure", "search.loss=kd"],
    "dms structure task+kd": ["search.mode=structure", "search.loss=task+kd"],
    "dms lora task": ["search.mode=lora", "search.loss=task"],
    "dms lora kd": ["search.mode=lora", "search.loss=kd"],
    # joint mode at its shipped weight learning rate (1e-4, meant for billion-parameter models) and at
    # 1e-3, a rate tuned for this 260K model (far above what full fine-tuning of a 7B model takes)
    "dms joint task": ["search.mode=joint", "search.loss=task"],
    "dms joint kd": ["search.mode=joint", "search.loss=kd"],
    "dms joint task+kd": ["search.mode=joint", "search.loss=task+kd"],
    "dms joint kd (lr 1e-3)": ["search.mode=joint", "search.loss=kd", "search.weight_lr=1e-3"],
    "dms joint task+kd (lr 1e-3)": ["search.mode=joint", "search.loss=task+kd", "search.weight_lr=1e-3"],
    "flap": ["method=flap"],
    "taylor": ["method=taylor"],
    "minitron": ["method=minitron"],
    "shortgpt": ["method=shortgpt"],
}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--calib", default=str(SHARED / "text" / "tinystories" / "validation_a.txt"))
    parser.add_argument("--wikitext", default=str(SHARED / "text" / "wikitext2" / "wiki.test.raw.txt"))
    parser.add_argument("--ratios", default="0.2,0.3,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of row labels")
    parser.add_argument("--set", nargs="*", default=[], help="key=value settings added to every row")
    parser.add_argument("--recover-steps", type=int, default=50)
    parser.add_argument("--wikitext-tokens", type=int, default=131072, help="first N tokens of WikiText-2 test")
    parser.add_argument("--kl-windows", type=int, default=128, help="WikiText-2 windows for the KL and entropy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--merge", nargs="+", help="combine the JSON files of separate runs into one table")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "quality"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.merge:
        parts = [json.loads(Path(file).read_text()) for file in args.merge]
        order = list(ROWS)  # the table lists the rows in ROWS's order, whichever run they came from
        rows = sorted(
            (r for part in parts for r in part["rows"]), key=lambda r: (r["ratio"], order.index(r["row"]), r["seed"])
        )
        args.seeds = ",".join(str(s) for s in sorted({r["seed"] for r in rows}))
        args.recover_steps, args.wikitext_tokens = parts[0]["recover_steps"], parts[0]["wikitext_tokens"]
        args.kl_windows = parts[0]["kl_windows"]
        return write(Path(args.out), rows, parts[0]["dense"], args, parts[0]["machine"])
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    wikitext = tokenize_text(tokenizer, load_text(args.wikitext))[: args.wikitext_tokens]
    recovery = RecoverConfig(method="lora", data=args.calib, steps=args.recover_steps, distill=True, lr=2e-3)
    dense = AutoModelForCausalLM.from_pretrained(args.model).eval()
    # the held-out tail of the calibration text: the same for every seed (the seed picks blocks from the head)
    heldout = calibration_blocks(tokenizer, DataConfig(calib=args.calib), 0).heldout
    wiki_blocks = split_blocks(wikitext, args.eval_seq_len)[: args.kl_windows]
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        recovery_data, teacher = recovery_teacher(dense, tokenizer, recovery, seed)  # one pass, shared by all
        for ratio in (float(r) for r in args.ratios.split(",")):
            for label in args.rows.split(","):
                config = apply_overrides(PruneConfig(ratio=ratio, seed=seed), ROWS[label] + args.set).validate()
                config.data.calib = args.calib
                config.eval.seq_len = args.eval_seq_len
                model = AutoModelForCausalLM.from_pretrained(args.model).eval()
                start = time.perf_counter()
                with PeakRSS() as memory:
                    model, report = prune(model, tokenizer, config, progress=False)
                seconds = time.perf_counter() - start
                pruned = {"in": report.perplexity["pruned"], "out": perplexity(model, wikitext, args.eval_seq_len),
                          **fidelity(model, dense, wiki_blocks)}  # fmt: skip
                model, _ = recover(model, tokenizer, recovery, teacher, seed, progress=False, data=recovery_data)
                recovered = {
                    "in": perplexity(model, heldout, args.eval_seq_len),  # the tail: the same for every row
                    "out": perplexity(model, wikitext, args.eval_seq_len),
                    **fidelity(model, dense, wiki_blocks),
                }
                row = {"row": label, "ratio": ratio, "seed": seed, "params": report.params["after"],
                       "pruned": pruned, "recovered": recovered, "seconds": round(seconds, 2),
                       "peak_rss_mib": round(memory.peak / 2**20, 1)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    dense_ppl = {"in": perplexity(dense, heldout, args.eval_seq_len),
                 "out": perplexity(dense, wikitext, args.eval_seq_len),
                 "entropy_out": prediction_entropy(dense, wiki_blocks)}  # fmt: skip
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    write(Path(args.out), rows, dense_ppl, args, machine)


def fidelity(model, dense, blocks, batch_size: int = 64) -> dict:
    """Out of domain: KL(dense || model) per token over the dense model's whole vocabulary (exact)
    and the model's own prediction entropy, in nats. The dense targets are made a batch at a time,
    so they never add to the prune's peak memory."""
    kl, tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        targets = teacher_targets(dense, batch, topk=dense.config.vocab_size)
        kl += kl_to_reference(model, targets, batch) * batch[:, 1:].numel()
        tokens += batch[:, 1:].numel()
    return {"kl_out": kl / tokens, "entropy_out": prediction_entropy(model, blocks)}


@torch.no_grad()
def prediction_entropy(model, blocks, batch_size: int = 8) -> float:
    """Mean entropy of the next-token distribution (a 512-token vocabulary: whole logits are small)."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        logp = torch.log_softmax(model(blocks[start : start + batch_size]).logits[:, :-1].float(), dim=-1)
        total += float(-(logp.exp() * logp).sum())
        count += logp.shape[0] * logp.shape[1]
    return total / count


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (row, ratio), with the seed spread (max / min) out of domain."""
    table = []
    for key in dict.fromkeys((r["row"], r["ratio"]) for r in rows):
        group = [r for r in rows if (r["row"], r["ratio"]) == key]
        entry = {"row": key[0], "ratio": key[1], "seeds": len(group)}
        for stage in ("pruned", "recovered"):
            for domain in ("in", "out", "kl_out", "entropy_out"):
                values = [r[stage][domain] for r in group]
                entry[f"{stage}_{domain}"] = statistics.mean(values)
                entry[f"{stage}_{domain}_spread"] = max(values) / min(values)
        entry["seconds"] = statistics.mean(r["seconds"] for r in group)
        entry["peak_rss_mib"] = max(r["peak_rss_mib"] for r in group)
        table.append(entry)
    return table


def spread(entry: dict, stage: str) -> str:
    return f"{entry[f'{stage}_out_spread']:.2f} / {entry[f'{stage}_kl_out_spread']:.2f}"


def write(out: Path, rows: list[dict], dense: dict, args, machine: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine.replace(" 1 threads", " 1 thread")
    table = summarise(rows)
    command = "python eval/benchmark_quality.py " + " ".join(sys.argv[1:])
    if args.merge:  # the per-seed runs of the docstring
        chosen = "" if args.rows == ",".join(ROWS) else f' --rows "{args.rows}"'
        command = f"python eval/benchmark_quality.py --seeds S --threads 1{chosen}` per seed, then `--merge"
    payload = {"machine": machine, "command": command, "dense": dense, "recover_steps": args.recover_steps,
               "wikitext_tokens": args.wikitext_tokens, "kl_windows": args.kl_windows, "summary": table,
               "rows": rows}  # fmt: skip
    out.with_suffix(".json").write_text(portable(json.dumps(payload, indent=2)) + "\n")
    lines = [
        f"stories260K calibrated on TinyStories; perplexity (seq {args.eval_seq_len}) on its held-out tail (in "
        f"domain) / the first {args.wikitext_tokens:,} tokens of WikiText-2 test (out of domain), mean over seeds "
        f"{args.seeds}; dense {dense['in']:.2f} / "
        f"{dense['out']:.1f} (its predictions' entropy on WikiText-2: {dense['entropy_out']:.2f} nats). "
        f"(b): LoRA r=8 + KL distillation from the dense model, {args.recover_steps} steps "
        "of 8 x 256 tokens of the calibration text, the same for every row. Spread: max / min over seeds, out of "
        f"domain. KL: KL(dense || pruned) per token on the first {args.kl_windows} of those WikiText-2 windows, "
        "nats: how faithfully the dense model's predictions survive out of domain. Lower is better; bold = best "
        "at that ratio.",
        "",
        "| ratio | method | params | (a) as pruned: ppl in / out, KL | spread ppl / KL | "
        "(b) recovered: ppl in / out, KL | spread ppl / KL | prune s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in dict.fromkeys(e["ratio"] for e in table):
        group = [e for e in table if e["ratio"] == ratio]
        keys = [f"{stage}_{m}" for stage in ("pruned", "recovered") for m in ("in", "out", "kl_out")]
        best = {k: min(e[k] for e in group) for k in keys}

        def cell(entry, stage, best=best):
            parts = []
            for domain, fmt in (("in", "{:.2f}"), ("out", "{:.0f}"), ("kl_out", "{:.3f}")):
                value = entry[f"{stage}_{domain}"]
                text = fmt.format(value)
                parts.append(f"**{text}**" if value == best[f"{stage}_{domain}"] else text)
            return " / ".join(parts)

        for e in group:
            params = next(r["params"] for r in rows if r["row"] == e["row"] and r["ratio"] == ratio)
            lines.append(
                f"| {ratio} | {e['row']} | {params:,} | {cell(e, 'pruned')} | {spread(e, 'pruned')} | "
                f"{cell(e, 'recovered')} | {spread(e, 'recovered')} | {e['seconds']:.1f} | "
                f"{e['peak_rss_mib']:.0f} |"
            )
    lines += ["", f"Machine: {machine}. Command: `{payload['command'].strip()}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
