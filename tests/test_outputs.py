"""Outputs under real conditions: concurrent runs, killed runs, read-only folders, no network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, STORIES, TINYSTORIES, require_shared

from dms_llm.card import model_card
from dms_llm.cli import main

HOLD = """from dms_llm.output_lock import claim_output
import time
with claim_output("out"):
    print("held", flush=True)
    time.sleep(120)
"""


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_one_run_per_output_and_a_killed_runs_leftovers_are_cleaned(tmp_path, monkeypatch, capsys):
    require_shared()
    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(STORIES, tmp_path)  # typed relative to where the user stands
    prune = ["prune", model, "--ratio", "0.2", "--calib", str(TINYSTORIES), "-o", "out", "--no-eval", "--quiet"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = _cli([*prune, "search.steps=2"], capsys)
        assert code == 2 and err.count("\n") == 1 and "another dms-llm run is writing 'out'" in err, err
        assert "loading" not in out
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the operating system drops its lock
        holder.wait()
    # what a run killed while saving leaves behind: the checkpoint's and the search state's staging
    (tmp_path / ".out.tmp-k1ll3d").mkdir()
    (tmp_path / ".out.tmp-k1ll3d" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "..out.search-state.tmp-4242").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's: not ours to touch
    code, out, err = _cli([*prune, "search.steps=2"], capsys)
    assert code == 0, err
    assert "removed 2 leftovers of a killed run" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".other.tmp-keep", "out"], names  # no staging, no lock file left
    # the base model is stored so that `recover --distill` finds it from any folder; the card shows its name only
    base = json.loads((tmp_path / "out" / "report.json").read_text())["model"]
    assert Path(base) == STORIES.resolve()
    monkeypatch.chdir(ROOT.parent)
    assert Path(base).is_dir()
    card = model_card(tmp_path / "out")
    assert str(STORIES.resolve()) not in card and "`stories260K`" in card


def test_eval_of_a_read_only_model_folder_writes_to_the_current_folder(tmp_path, monkeypatch, capsys):
    require_shared()
    import shutil

    model = tmp_path / "readonly-model"
    shutil.copytree(STORIES, model)
    text = tmp_path / "short.txt"
    text.write_text(TINYSTORIES.read_text()[:4000])
    model.chmod(0o555)  # as the shared model folders are (root could write there; dms-llm does not)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = _cli(["eval", str(model), "--ppl", str(text), "--seq-len", "32"], capsys)
    assert code == 0, err
    assert json.loads((work / "readonly-model-eval.json").read_text())["perplexity"]
    assert not (model / "eval.json").exists()
    code, out, err = _cli(["eval", str(model), "--ppl", str(text), "--seq-len", "32", "--output", "r.json"], capsys)
    assert code == 0 and (work / "r.json").is_file(), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "some-org/some-model", "--ratio", "0.2", "-o", "out"], "the Hub cannot be reached"),
        (["prune", str(STORIES), "--ratio", "0.2", "-o", "out"], "the Hub cannot be reached"),  # default wikitext2
    ],
)
def test_without_a_network_a_hub_lookup_fails_in_seconds(tmp_path, argv, message):
    require_shared()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dms_llm", *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True)  # fmt: skip
    elapsed = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert elapsed < 30  # was ~31 s of retries for the model lookup alone; most of this is Python's start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] or not list(tmp_path.iterdir())


def test_eval_with_a_device_map_loads_through_accelerate_and_scores_the_same(tmp_path, monkeypatch, capsys):
    """`dms-llm eval --device-map auto` (the way to score a pruned model larger than one GPU, as the
    sharded prune's refusal advises) takes transformers' dispatching loader, with the same result."""
    require_shared()
    import dms_llm.checkpoint as checkpoint

    text = tmp_path / "short.txt"
    text.write_text(TINYSTORIES.read_text()[:4000])
    maps = []
    real = checkpoint.load_causal_lm
    monkeypatch.setattr(checkpoint, "load_causal_lm", lambda *a: maps.append(a[3]) or real(*a))
    scores = {}
    for name, extra in (("plain", []), ("mapped", ["--device-map", "auto"])):
        argv = ["eval", str(STORIES), "--ppl", str(text), "--seq-len", "32", "--output", str(tmp_path / f"{name}.json")]
        code, out, err = _cli([*argv, *extra], capsys)
        assert code == 0, err
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]
    assert maps == [None, "auto"]
    assert scores["mapped"] == pytest.approx(scores["plain"], rel=1e-6)
