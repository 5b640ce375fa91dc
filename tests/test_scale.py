"""Data-parallel search, resume after a kill, and joint mode."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, STORIES, TINYSTORIES, require_shared
from transformers import AutoModelForCausalLM

from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.config import SearchConfig
from dms_llm.errors import DMSError
from dms_llm.losses import teacher_targets
from dms_llm.masks import MaskSet
from dms_llm.search_loop import search
from dms_llm.slicing import slice_model

WORKER = ROOT / "tests" / "dp_worker.py"


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_process_search_matches_one_process_with_two_micro_batches(tmp_path):
    require_shared()
    torchrun = shutil.which("torchrun") or str(sys.executable).replace("python", "torchrun")
    distributed = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "dp"), "1"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "single"), "2"], capture_output=True, text=True, env=_env()
    )
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / "dp" / f"rank{r}.json").read_text()) for r in (0, 1))
    alone = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert rank0["world"] == rank1["world"] == 2 and alone["world"] == 1
    # the ranks agree exactly: same masks, ratios and importances at the end
    for key in ("architecture", "ratios", "importance"):
        assert rank0[key] == rank1[key], key
    # one process over the same blocks (2 micro-batches per step) finds the same structure
    assert alone["architecture"] == rank0["architecture"]
    for kind, values in alone["ratios"].items():
        # summation order differs (all-reduce vs accumulation): ~1e-4 after 32 Adam steps
        torch.testing.assert_close(torch.tensor(values), torch.tensor(rank0["ratios"][kind]), atol=1e-3, rtol=0)
    mean_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]
    torch.testing.assert_close(torch.tensor(alone["losses"]), torch.tensor(mean_losses), atol=1e-4, rtol=0)


def fresh_run(calib, config, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=0.3)
    result = search(model, masks, counter, budget, calib.calib, config, seed=0, progress=False, **kwargs)
    return result, masks


@pytest.mark.parametrize("interrupt_at", [34, 53])  # before and after heads/layers freeze (step 48)
def test_resume_after_an_interruption_ends_with_the_same_architecture(calib, tmp_path, interrupt_at):
    config = SearchConfig(mode="structure", steps=60, batch_size=4, save_every=10, layer_score_every=15, score_blocks=8)
    expected, expected_masks = fresh_run(calib, config)

    def interrupt(step, record):
        if step == interrupt_at:
            raise KeyboardInterrupt

    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        fresh_run(calib, config, state_dir=state, on_step=interrupt)
    assert json.loads((state / "state.json").read_text())["step"] == interrupt_at // 10 * 10
    resumed, resumed_masks = fresh_run(calib, config, state_dir=state, resume=True)
    assert resumed.architecture == expected.architecture
    for kind in expected_masks.keep_ratios:
        assert torch.equal(resumed_masks.keep_ratios[kind], expected_masks.keep_ratios[kind])
    assert [h["task_loss"] for h in resumed.history] == [h["task_loss"] for h in expected.history]


def test_resume_refuses_a_state_from_different_settings(calib, tmp_path):
    config = SearchConfig(mode="structure", steps=20, batch_size=4, save_every=10, layer_score_every=10, score_blocks=8)
    fresh_run(calib, config, state_dir=tmp_path / "state")
    changed = SearchConfig(
        mode="structure", steps=20, batch_size=4, save_every=10, layer_score_every=10, score_blocks=8, lr=0.05
    )
    with pytest.raises(DMSError, match=r"different settings \(search\)"):
        fresh_run(calib, changed, state_dir=tmp_path / "state", resume=True)


@pytest.mark.slow
def test_prune_command_killed_mid_search_resumes_to_the_same_model(tmp_path):
    require_shared()

    def command(out, *extra):
        return [
            sys.executable,
            "-m",
            "dms_llm",
            "prune",
            str(STORIES),
            "--ratio",
            "0.25",
            "--calib",
            str(TINYSTORIES),
            "-o",
            str(out),
            "--quiet",
            "--no-eval",
            "search.steps=40",
            "search.save_every=10",
            "data.num_blocks=64",
            *extra,
        ]

    reference = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True, env=_env())
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    state = tmp_path / ".killed.search-state"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 120
    while not (state / "state.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (state / "state.json").exists() and not out.exists()
    resumed = subprocess.run(command(out, "--resume"), capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not state.exists()  # cleaned up once the checkpoint is saved
    saved = json.loads((out / "report.json").read_text())
    expected = json.loads((tmp_path / "reference" / "report.json").read_text())
    assert saved["architecture"] == expected["architecture"]
    assert saved["params"] == expected["params"]


def test_joint_mode_trains_weights_and_keeps_the_invariants(calib):
    require_shared()
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    teacher = teacher_targets(model, calib.calib)  # the dense model's view, before it trains
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=0.3)
    config = SearchConfig(
        mode="joint", steps=40, batch_size=4, layer_score_every=10, score_blocks=8, weight_lr=1e-3, save_every=0
    )
    result = search(model, masks, counter, budget, calib.calib, config, progress=False, teacher=teacher)
    assert budget.floor <= result.params <= budget.target
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the weights trained
    assert all(not p.requires_grad for p in model.parameters())
    tokens = calib.heldout[:256].view(2, 128)
    masks.mode = "hard"
    masks.refresh()
    with torch.no_grad():
        masked = model(tokens).logits
    masks.remove()
    slice_model(model, result.architecture)
    with torch.no_grad():
        sliced = model(tokens).logits
    torch.testing.assert_close(sliced, masked, atol=max(1e-5, 1.5e-6 * masked.abs().max().item()), rtol=0)


def test_resume_refuses_a_state_made_on_other_calibration_text_or_another_model(calib, tmp_path):
    config = SearchConfig(mode="structure", steps=10, batch_size=4, save_every=10, layer_score_every=10, score_blocks=8)
    fresh_run(calib, config, state_dir=tmp_path / "state")
    other_text = type(calib)(**{**calib.__dict__, "calib": calib.calib.flip(0).roll(1, dims=1)})
    with pytest.raises(DMSError, match=r"different settings \(calibration\)"):
        fresh_run(other_text, config, state_dir=tmp_path / "state", resume=True)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.01)  # same shapes, other weights
    masks = MaskSet(model)
    counter = ParamCounter.from_model(model, masks.adapter)
    with pytest.raises(DMSError, match=r"different settings \(model\)"):
        search(model, masks, counter, resolve_budget(counter, ratio=0.3), calib.calib, config, seed=0,
               progress=False, state_dir=tmp_path / "state", resume=True)  # fmt: skip


def test_interrupt_says_the_search_state_is_kept_and_how_to_resume(tmp_path):
    require_shared()
    out, state = tmp_path / "out", tmp_path / ".out.search-state"
    command = [sys.executable, "-m", "dms_llm", "prune", str(STORIES), "--ratio", "0.25", "--calib", str(TINYSTORIES),
               "-o", str(out), "--quiet", "--no-eval", "search.steps=400", "search.save_every=10",
               "data.num_blocks=64", "--layout", "per-layer"]  # fmt: skip
    # Ctrl-C's default action in the child, even when this suite runs as a background job (whose
    # children inherit an ignored SIGINT, and Python then never raises KeyboardInterrupt)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not (state / "state.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "no model was written; the search state is kept" in stderr and "--resume" in stderr
    assert (state / "state.json").exists() and not out.exists()
