"""Multi-process runs of the real command line: torchrun and accelerate launch with 2 CPU ranks.

Both must give two ranks that split the calibration blocks, keep identical masks and find the
architecture one process finds with ``search.grad_accum=2``; only the main rank writes, so the
output is exactly one complete folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STORIES, TINYSTORIES, require_shared
from safetensors import safe_open

PRUNE = [
    "prune",
    str(STORIES),
    "--ratio",
    "0.25",
    "--calib",
    str(TINYSTORIES),
    "--quiet",
    "search.steps=30",
    "search.batch_size=4",
    "data.num_blocks=64",
    "search.layer_score_every=10",
]


def _env():
    # one thread per rank, as the launchers set it, so every run sums in the same order
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed next to this Python")
    return found


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process accumulating 2 micro-batches per step."""
    require_shared()
    folder = tmp_path_factory.mktemp("single")
    done = _run([sys.executable, "-m", "dms_llm", *PRUNE, "-o", "out", "search.grad_accum=2"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "out" / "report.json").read_text())


LAUNCHERS = {
    "torchrun": lambda: [_tool("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dms_llm"],
    "accelerate": lambda: [_tool("accelerate"), "launch", "--num_processes", "2", "--cpu", "-m", "dms_llm"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_rank_cli_writes_one_complete_folder_with_the_one_process_architecture(
    launcher, one_process, tmp_path
):
    done = _run([*LAUNCHERS[launcher](), *PRUNE, "-o", "out"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # only the main rank writes: one folder, no staging or search-state leftovers, one "saved to"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert done.stdout.count("saved to") == 1
    out = tmp_path / "out"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert len(list(weights.keys())) > 0
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["processes"] == 2
    assert report["architecture"] == one_process["architecture"]
    assert report["params"] == one_process["params"]
    assert sum(1 for _ in out.iterdir()) >= 5  # config, weights, tokenizer, report, modeling file


def test_an_fsdp_launch_is_refused_before_any_weights_load():
    # accelerate only reports FSDP on GPUs, so a stand-in accelerator plays the launched rank
    from accelerate import DistributedType

    from dms_llm.errors import DMSError
    from dms_llm.launch import check_distributed

    class FsdpRank:
        distributed_type = DistributedType.FSDP

    with pytest.raises(DMSError, match="FSDP-sharded searches are not supported yet"):
        check_distributed(FsdpRank())
