"""Regenerate (or check) the README's generated blocks: the prune example's output and every
results table.

A block sits between ``<!-- begin: KEY -->`` and ``<!-- end: KEY -->``:

- ``prune-example``: the output of the README's stories260K command, run now from the repository
  root (its ``-o`` goes to a scratch folder; the output names the default folder, as the command
  shown does);
- ``results/NAME.md``: the file ``eval/results/NAME.md`` as the benchmark wrote it.

    python eval/update_readme.py           # rewrite the blocks in README.md
    python eval/update_readme.py --check   # exit 1 if a results block differs from its file, or if
                                           # the example's architecture or size no longer reproduces

The check compares the example's architecture table and parameter lines, not its timing (or the
last digits of its perplexity, which depend on the CPU's float kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL = "../shared/data/models/stories260K"
CALIB = "../shared/data/text/tinystories/validation_a.txt"
PRUNE_ARGS = ["prune", MODEL, "--ratio", "0.2", "--calib", CALIB, "--quiet", "eval.seq_len=256"]
BLOCK = re.compile(r"(<!-- begin: (?P<key>\S+) -->\n)(?P<body>.*?)(<!-- end: (?P=key) -->)", re.S)


def prune_example() -> str:
    """The example command and its output, as a user running it from the repository root sees it."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "stories260K-dms-20"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "dms_llm", *PRUNE_ARGS, "-o", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"the example failed:\n{result.stderr}")
        output = result.stdout.replace(str(out), out.name)
    command = f"$ dms-llm prune {MODEL} --ratio 0.2 \\\n      --calib {CALIB} --quiet eval.seq_len=256\n"
    return f"```text\n{command}{output.rstrip()}\n```\n"


def generated(key: str) -> str:
    if key == "prune-example":
        return prune_example()
    if key.startswith("results/"):
        return (ROOT / "eval" / key).read_text().rstrip() + "\n"
    raise SystemExit(f"README block {key!r}: unknown generator")


def architecture(block: str) -> list[str]:
    """What must reproduce exactly: the per-layer table's rows and the parameter lines."""
    return [line.rstrip() for line in block.splitlines() if line.startswith(("│", "parameters:", "non-embedding"))]


def sizes(block: str) -> tuple[list[str], int, int, list[str]]:
    """What reproduces on every CPU: which layers are kept, the kept KV heads and MLP channels in
    all, and the parameter lines. Which of two nearly tied heads or channels a layer keeps depends
    on the float rounding of the machine's kernels (an AMD EPYC with AVX-512 chose differently from
    the machine that wrote the README, at the same sizes)."""
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in architecture(block) if line[0] == "│"]
    kept = [row[1] for row in rows]
    heads = sum(int(row[2].split("/")[0]) for row in rows if row[1] == "yes")
    channels = sum(int(row[4].split("/")[0]) for row in rows if row[1] == "yes")
    return kept, heads, channels, [line for line in architecture(block) if line[0] != "│"]


def check(readme: str, example: bool = True) -> list[str]:
    """What differs; ``example=False`` leaves out the example (its test runs the command itself)."""
    problems = []
    for match in BLOCK.finditer(readme):
        key, body = match["key"], match["body"]
        if key == "prune-example" and not example:
            continue
        if key == "prune-example":
            now = architecture(generated(key))
            if not now or architecture(body) != now:
                problems.append("prune-example: the README shows\n  " + "\n  ".join(architecture(body)) +
                                "\nbut the command now gives\n  " + "\n  ".join(now))  # fmt: skip
        elif body != generated(key):
            problems.append(f"{key}: the README's copy differs from eval/{key}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    parser.add_argument(
        "--results-only", action="store_true", help="leave the prune example (its timing wants an idle machine)"
    )
    args = parser.parse_args()
    readme = README.read_text()
    keys = [match["key"] for match in BLOCK.finditer(readme)]
    if args.check:
        problems = check(readme)
        print("\n".join(problems) or f"README blocks up to date: {', '.join(keys)}")
        return 1 if problems else 0
    if args.results_only:
        keys = [key for key in keys if key != "prune-example"]
    updated = BLOCK.sub(lambda m: m[1] + generated(m["key"]) + m[4] if m["key"] in keys else m[0], readme)
    README.write_text(updated)
    print(f"regenerated {len(keys)} blocks: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
