"""Weights that cannot fit where they load are refused before anything is read.

The refusal of a model larger than any test machine's memory (Llama-3.1-405B's shape) runs for
every verb in ``test_bad_input_sweep``; here the device's free memory is set, to check what is
counted: every local CPU rank's copy, a sharded rank's rows, and the hints given.
"""

import pytest
import torch
from conftest import STORIES, TINYSTORIES, require_shared

import dms_llm.memory_room
from dms_llm.cli import main
from dms_llm.config import PruneConfig
from dms_llm.errors import DMSError
from dms_llm.memory_room import check_weight_memory
from dms_llm.plan import prune_plan

GIB = 2**30


def _available(monkeypatch, free: int) -> None:
    monkeypatch.setattr(dms_llm.memory_room, "available_memory", lambda device: free)


def test_the_check_counts_every_local_cpu_copy_and_hints_what_fits(monkeypatch):
    _available(monkeypatch, 10 * GIB)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    check_weight_memory(9 * GIB, cpu, torch.float32, "the weights")  # fits
    with pytest.raises(DMSError) as error:
        check_weight_memory(12 * GIB, cpu, torch.float32, "the weights")
    assert "take 12.00 GiB in float32, more than the 10.00 GiB this machine has available" in str(error.value)
    assert "--dtype bfloat16 halves the weights (then they fit)" in str(error.value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on one host: two copies
    with pytest.raises(DMSError, match=r"6.00 GiB in float32 in each of 2 processes \(12.00 GiB in all\)"):
        check_weight_memory(6 * GIB, cpu, torch.float32, "the weights")
    check_weight_memory(6 * GIB, cpu, torch.float32, "the weights", copies=1)  # one process's own check
    with pytest.raises(DMSError) as error:  # a GPU rank has its own GPU: one copy, no bfloat16 hint
        check_weight_memory(12 * GIB, gpu, torch.bfloat16, "the weights")
    assert "more than the 10.00 GiB cuda:1 has free; --device-map auto" in str(error.value)
    assert "bfloat16 halves" not in str(error.value)


def test_prune_counts_each_rank_before_the_ranks_join(monkeypatch, capsys, tmp_path):
    require_shared()
    monkeypatch.chdir(tmp_path)
    plan = prune_plan(str(STORIES), PruneConfig(ratio=0.2, device="cpu", dtype="float32"), launched=2)
    # room for one rank's whole model and its adapters, not for two; two halves of the layers fit
    per_rank = plan.weight_bytes + plan.adapter_bytes
    sharded = plan.shard_rank_bytes[2] + plan.adapter_bytes
    assert 2 * sharded < 1.5 * per_rank
    _available(monkeypatch, int(1.5 * per_rank))
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    argv = ["prune", str(STORIES), "--ratio", "0.2", "--calib", str(TINYSTORIES), "-o", "out", "--device", "cpu"]
    assert main([*argv, "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "in each of 2 processes" in error and "or split it with --shard" in error, error
    assert main([*argv, "--dry-run", "--shard"]) == 0  # each rank holds its rows: it fits
    out = capsys.readouterr().out
    memory = f"memory: weights of {str(STORIES)!r} (this rank's rows) and the search's LoRA adapters take 2 processes x"
    assert memory in out, out
    _available(monkeypatch, int(1.5 * sharded))
    assert main([*argv, "--dry-run", "--shard"]) == 2
    assert "the weights of" in (error := capsys.readouterr().err) and "(this rank's rows)" in error, error
    assert not (tmp_path / "out").exists()


def test_a_containers_memory_limit_bounds_the_room_and_its_page_cache_counts_as_free(tmp_path):
    from dms_llm.memory_room import container_room

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{16 * GIB}\n")
    (v2 / "memory.current").write_text(f"{10 * GIB}\n")
    (v2 / "memory.stat").write_text(f"anon {4 * GIB}\nfile {6 * GIB}\nkernel 0\n")
    assert container_room(v2) == 12 * GIB  # 16 - 10 in use, of which 6 are reclaimable page cache
    (v2 / "memory.max").write_text("max\n")
    assert container_room(v2) is None  # no limit: the host's memory decides
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{3 * GIB}\n")
    (v1 / "memory.stat").write_text(f"cache {GIB}\nrss {2 * GIB}\ntotal_cache {GIB}\n")
    assert container_room(tmp_path / "v1") == 6 * GIB
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert container_room(tmp_path / "v1") is None
    assert container_room(tmp_path / "none") is None


def test_joint_mode_counts_the_gradients_and_adamw_moments_of_every_weight(monkeypatch, capsys, tmp_path):
    require_shared()
    monkeypatch.chdir(tmp_path)
    plan = prune_plan(str(STORIES), PruneConfig(ratio=0.2, device="cpu", dtype="float32"))
    _available(monkeypatch, 3 * plan.weight_bytes)  # the weights fit; with 3 more copies they do not
    argv = ["prune", str(STORIES), "--ratio", "0.2", "--calib", str(TINYSTORIES), "-o", "out", "--device", "cpu"]
    assert main([*argv, "--dry-run", "--mode", "structure"]) == 0
    assert main([*argv, "--dry-run", "--mode", "joint"]) == 2
    error = capsys.readouterr().err
    assert "with their gradients and AdamW moments (joint mode)" in error and "--mode lora (the default)" in error
