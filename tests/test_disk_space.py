"""Room on disk: runs whose output cannot fit refuse to start; a disk that fills up anyway gives one
line, leaves no partial files, and a prune keeps its search state for ``--resume``.

The real failures come from the operating system: each CLI run below is a separate process whose
file-size limit (``ulimit -f``, RLIMIT_FSIZE) makes the kernel refuse the write with EFBIG, as a
FAT32 stick does, or it runs on a disk reported as fuller than it is.
"""

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, STORIES, TINYSTORIES, require_shared
from safetensors import SafetensorError

import dms_llm.checkpoint
import dms_llm.disk_space
from dms_llm import PruneConfig, prune
from dms_llm.checkpoint import empty_model, load_config
from dms_llm.cli import main
from dms_llm.config import RecoverConfig
from dms_llm.disk_space import MARGIN, DiskFullError, disk_error_code, disk_errors
from dms_llm.plan import prune_plan
from dms_llm.recover_state import checkpoint_bytes
from dms_llm.tokenizer_files import tokenizer_files_bytes

QUICK = ["--quiet", "--no-eval", "search.steps=4", "search.save_every=2", "data.num_blocks=64"]


def _dms_llm(args, cwd: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """The CLI as its own process; with ``max_file_bytes`` the kernel refuses larger files (EFBIG)."""
    limit = None
    if max_file_bytes is not None:

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dms_llm", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, preexec_fn=limit)  # fmt: skip


def _prune_args(out: str, *extra: str) -> list[str]:
    return ["prune", str(STORIES), "--ratio", "0.2", "--calib", str(TINYSTORIES), "-o", out, *QUICK, *extra]


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dms-llm: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_checkpoint_too_large_to_write_keeps_the_search_and_resume_finishes_it(tmp_path):
    # the weights (~830 KB) cannot be written, the structure-mode search state (masks, ~4 KB) can
    require_shared()
    reference = _dms_llm(_prune_args("reference", "search.mode=structure"), tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    failed = _dms_llm(_prune_args("out", "search.mode=structure"), tmp_path, max_file_bytes=256 * 1024)
    line = _one_line_error(failed)
    assert "could not write the checkpoint to 'out': File too large" in line and "another disk" in line
    # nothing half-written: no output folder and no staging folder; the search state is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.search-state", "reference"]
    resumed = _dms_llm(_prune_args("out", "search.mode=structure", "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / ".out.search-state").exists()
    arch = [json.loads((tmp_path / name / "report.json").read_text())["architecture"] for name in ("out", "reference")]
    assert arch[0] == arch[1]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "reference" / "model.safetensors"
    ).read_bytes()


def test_a_search_state_that_cannot_be_saved_stops_the_run_cleanly(tmp_path):
    # lora mode's state holds the adapters and their moments (~0.5 MB): its first save fails
    require_shared()
    failed = _dms_llm(_prune_args("out", "search.mode=lora"), tmp_path, max_file_bytes=64 * 1024)
    line = _one_line_error(failed)
    assert "could not write the search state to '.out.search-state': File too large" in line
    assert "--resume" not in line  # no state was ever saved: there is nothing to resume
    assert list(tmp_path.iterdir()) == []  # no partial state, no staging folder, no output


def test_a_gguf_too_large_for_the_filesystem_leaves_no_file(tmp_path):
    require_shared()
    failed = _dms_llm(["export", str(STORIES), "-o", "model.gguf", "--outtype", "f32"], tmp_path, 256 * 1024)
    line = _one_line_error(failed)
    assert "could not write the GGUF file to 'model.gguf': File too large" in line
    assert list(tmp_path.iterdir()) == []  # no staging file and no lock left


def test_an_adapter_checkpoint_too_large_to_write_leaves_nothing(tmp_path):
    require_shared()
    args = ["recover", str(STORIES), "-o", "out", "--data", str(TINYSTORIES), "--steps", "4", "--save-every", "2"]
    failed = _dms_llm([*args, "--quiet"], tmp_path, max_file_bytes=100 * 1024)  # the adapter is ~190 KB
    line = _one_line_error(failed)
    assert "could not write the adapter checkpoint to 'out-checkpoints/step-2': File too large" in line
    assert list(tmp_path.iterdir()) == []  # no half-written adapter, no empty checkpoints folder


def _report_free(monkeypatch, free: int) -> None:
    """Every disk reports ``free`` bytes free (what ``df`` would say of a nearly full one)."""
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return usage._replace(free=free)

    monkeypatch.setattr(dms_llm.disk_space.shutil, "disk_usage", disk_usage)


@pytest.mark.parametrize("mode", ["structure", "lora", "joint"])
def test_prune_refuses_before_loading_when_its_checkpoint_and_state_cannot_fit(tmp_path, monkeypatch, capsys, mode):
    require_shared()
    monkeypatch.chdir(tmp_path)
    plan = prune_plan(str(STORIES), PruneConfig.from_dict({"ratio": 0.2, "search": {"mode": mode}}))
    argv = _prune_args("out", f"search.mode={mode}")

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the disk was checked")

    monkeypatch.setattr(dms_llm.checkpoint, "load_model", no_loading)
    _report_free(monkeypatch, plan.disk_bytes + MARGIN - 1)
    assert main(argv) == 2
    error = capsys.readouterr().err
    what = "writing the checkpoint and the search state takes" if mode != "structure" else "checkpoint takes"
    assert what in error and "free some space or write somewhere else" in error, error
    assert list(tmp_path.iterdir()) == []
    _report_free(monkeypatch, plan.disk_bytes + MARGIN)  # just enough: the plan is printed
    assert main([*argv, "--dry-run"]) == 0
    assert f"at most {dms_llm.disk_space.size_text(plan.disk_bytes)} at a time" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["lora", "joint"])
def test_the_planned_disk_is_what_the_search_state_and_checkpoint_take(tmp_path, stories, mode):
    # the plan's estimate, from the config alone, against the files a real run writes
    model, tokenizer = stories
    config = PruneConfig.from_dict({
        "ratio": 0.2, "data": {"calib": str(TINYSTORIES), "num_blocks": 64},
        "search": {"mode": mode, "steps": 2, "save_every": 2}, "eval": {"heldout": False},
    })  # fmt: skip
    plan = prune_plan(str(STORIES), config)
    pruned, report = prune(model, tokenizer, config, progress=False, state_dir=tmp_path / "state")
    state = (tmp_path / "state" / "state.safetensors").stat().st_size
    assert 0.97 * plan.state_bytes <= state <= 1.03 * plan.state_bytes + 64 * 1024, (state, plan.state_bytes)
    folder = dms_llm.checkpoint.save_pruned(pruned, tokenizer, tmp_path / "out", report=report.to_dict())
    written = sum(file.stat().st_size for file in folder.iterdir())
    planned = plan.pruned_bytes + plan.tokenizer_bytes
    assert 0.95 * planned <= written <= planned + MARGIN, (written, planned)


def test_recover_and_export_refuse_before_working_when_their_output_cannot_fit(tmp_path, monkeypatch, capsys):
    require_shared()
    monkeypatch.chdir(tmp_path)
    _report_free(monkeypatch, 2 * 2**20)  # stories260K's weights fit, the margin for the rest does not
    assert main(["recover", str(STORIES), "-o", "out", "--data", str(TINYSTORIES), "--quiet"]) == 2
    assert "writing the recovered checkpoint takes about" in capsys.readouterr().err
    assert main(["export", str(STORIES), "-o", "model.gguf", "--outtype", "f32"]) == 2
    assert "writing the f32 GGUF file takes about" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_recover_counts_the_adapter_checkpoints_it_keeps(tmp_path, monkeypatch, capsys):
    require_shared()
    monkeypatch.chdir(tmp_path)
    skeleton = empty_model(load_config(str(STORIES)))
    one_checkpoint = checkpoint_bytes(skeleton, RecoverConfig())  # the adapter and its optimizer state
    output = sum(p.numel() for p in skeleton.parameters()) * 4 + tokenizer_files_bytes(str(STORIES))
    _report_free(monkeypatch, output + MARGIN + one_checkpoint)  # the model and one checkpoint fit, not two
    args = ["recover", str(STORIES), "-o", "out", "--data", str(TINYSTORIES), "--quiet", "--steps", "4"]
    assert main([*args, "--save-every", "2"]) == 2
    error = capsys.readouterr().err
    assert "writing the recovered checkpoint and its adapter checkpoints takes about" in error, error
    assert list(tmp_path.iterdir()) == []
    assert main([*args, "--save-every", "4"]) == 0  # one checkpoint: it fits, and is that size
    written = sum(file.stat().st_size for file in (tmp_path / "out-checkpoints" / "step-4").iterdir())
    assert one_checkpoint <= written <= one_checkpoint + 64 * 1024, (written, one_checkpoint)


def test_the_errors_that_mean_no_room_and_only_those():
    assert disk_error_code(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert disk_error_code(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    # safetensors' own error (a Rust I/O error), as save_file raises it on a full disk
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_error_code(rust) == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError as error:
            raise RuntimeError("writing a shard failed") from error
    except RuntimeError as wrapped:
        assert disk_error_code(wrapped) == errno.EFBIG
    # numpy's short write (the GGUF writer's tofile) carries no errno: a full disk, or a size limit
    assert disk_error_code(OSError("11008 requested and 7080 written"), ".") in (errno.ENOSPC, errno.EFBIG)
    assert disk_error_code(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_error_code(ValueError("os error 13")) is None
    with (
        pytest.raises(DiskFullError, match="No space left on device.*free there now") as caught,
        disk_errors(".", "the checkpoint"),
    ):
        raise rust
    assert caught.value.code == errno.ENOSPC
    # any other failure is not disguised as a full disk
    with pytest.raises(PermissionError), disk_errors(".", "the checkpoint"):
        raise PermissionError(errno.EACCES, "Permission denied")


def _hub_model(weights_claimed: int) -> dict[str, tuple[bytes, int]]:
    """stories260K's config and tokenizer as a Hub repository whose listing claims ``weights_claimed``
    bytes of safetensors (never downloaded: the check must stop before)."""
    files = {f.name: (f.read_bytes(), f.stat().st_size) for f in STORIES.iterdir() if f.suffix != ".safetensors"}
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.dumps({"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}).encode()
    half = weights_claimed // 2
    return {**files, "model.safetensors.index.json": (index, len(index)),
            shards[0]: (b"", half), shards[1]: (b"", weights_claimed - half)}  # fmt: skip


def test_a_hub_model_larger_than_the_cache_disk_is_refused_before_downloading(tmp_path):
    # huggingface_hub only warns, file by file, and fails part-way; the real client runs here, against
    # a local stand-in for the Hub whose listing claims 1 PiB of weights
    require_shared()
    from fake_hub import FakeHub

    with FakeHub(models={"org/huge": _hub_model(2**50)}) as hub:
        online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
        env = {**os.environ, **online, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
        for extra in ([], ["--dry-run"]):
            result = subprocess.run(
                [sys.executable, "-m", "dms_llm", "prune", "org/huge", "--ratio", "0.2", "-o", "out",
                 "--calib", str(TINYSTORIES), *extra], capture_output=True, text=True, env=env, cwd=tmp_path,
            )  # fmt: skip
            line = _one_line_error(result)
            # the tokenizer's three files and the index's two shards (config.json and the index were read)
            assert "org/huge's 5 missing files into the Hugging Face cache takes about 1024.00 TiB" in line, line
            assert "HF_HOME" in line
        assert not any(path.endswith(".safetensors") for _, path in hub.calls if "/resolve/" in path)
    assert not (tmp_path / "out").exists()


def test_the_download_check_counts_only_the_files_the_cache_lacks(tmp_path, monkeypatch):
    require_shared()
    from fake_hub import FakeHub
    from huggingface_hub import constants

    from dms_llm.disk_space import check_download_room
    from dms_llm.model_files import METADATA_FILES

    patterns = (*METADATA_FILES, "*.safetensors")
    model = _hub_model(2 * 2**20)
    model["config.json"] = (model["config.json"][0], 2**50)  # the listing claims a huge config.json
    with FakeHub(models={"org/small": model}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        with pytest.raises(dms_llm.errors.DMSError, match="org/small's 7 missing files"):
            check_download_room.__wrapped__("org/small", patterns)
        # the real client downloads config.json into that cache (its own process: the endpoint is read at import)
        online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub")}
        download = "import huggingface_hub; huggingface_hub.hf_hub_download('org/small', 'config.json')"
        subprocess.run([sys.executable, "-c", download], check=True, env={**os.environ, **online})
        check_download_room.__wrapped__("org/small", patterns)  # cached now: 2 MiB of weights fit
        _report_free(monkeypatch, 2 * 2**20)
        with pytest.raises(dms_llm.errors.DMSError, match="org/small's 6 missing files"):
            check_download_room.__wrapped__("org/small", patterns)
