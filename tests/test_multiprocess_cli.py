"""Multi-process runs of the real command line: torchrun and accelerate launch with 2 CPU ranks.

Both must give two ranks that split the calibration blocks, keep identical masks and find the
architecture one process finds with ``search.grad_accum=2``; only the main rank writes, so the
output is exactly one complete folder. With ``--shard`` the ranks split every decoder layer
(FSDP on gloo) and must find exactly what the data-parallel ranks find.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES, TINYSTORIES, require_shared
from safetensors import safe_open

from dms_llm.budget import BUDGET_TOLERANCE
from dms_llm.config import PruneConfig
from dms_llm.plan import prune_plan

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
# the exact rank-vs-one-process comparisons hold in structure mode (frozen weights); the defaults
# ("auto": lora with task+kd, data-parallel or --shard) are checked where they apply
PINNED = [*PRUNE, "--mode", "structure", "--loss", "task"]


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
    done = _run([sys.executable, "-m", "dms_llm", *PINNED, "-o", "out", "search.grad_accum=2"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "out" / "report.json").read_text())


LAUNCHERS = {
    "torchrun": lambda: [_tool("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dms_llm"],
    "accelerate": lambda: [_tool("accelerate"), "launch", "--num_processes", "2", "--cpu", "-m", "dms_llm"],
}


@pytest.mark.slow
def test_two_rank_lora_search_follows_the_one_process_search(tmp_path):
    # --loss kd: every rank holds the dense targets of all blocks (each made 1/2 of them) and selects
    # its own rows each step (the split is exact: test_search_losses).
    # --mode lora: the adapters' gradients are averaged over the ranks like the keep ratios'. Unaveraged,
    # each rank's adapters would fit its own half of the blocks and the sizes would part within steps;
    # averaged, the ranks differ from one process only by summation order, which the trained adapters
    # carry until a late channel choice may differ (how late depends on the CPU's float rounding)
    require_shared()
    lora = [*PINNED, "--mode", "lora", "--loss", "kd", "--no-eval"]
    one = _run([sys.executable, "-m", "dms_llm", *lora, "-o", "one", "search.grad_accum=2"], tmp_path)
    two = _run([*LAUNCHERS["torchrun"](), *lora, "-o", "two"], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # only the main rank wrote
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert reports[1]["settings"]["search"]["mode"] == "lora" and reports[1]["search"]["processes"] == 2
    sizes = [[h["params"] for h in report["search"]["history"]] for report in reports]
    assert sizes[0][:20] == sizes[1][:20]
    # the late channel choice may differ (it did on an AMD EPYC, AVX-512: 194,816 vs 195,008 params),
    # so the final sizes agree as the budget does: both land at or under the target, within tolerance
    for report in reports:
        params = report["params"]
        assert params["target"] - BUDGET_TOLERANCE * params["before"] <= params["after"] <= params["target"]
    with safe_open(tmp_path / "two" / "model.safetensors", "pt") as weights:
        assert not any("lora" in name for name in list(weights.keys()))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_rank_cli_writes_one_complete_folder_with_the_one_process_architecture(launcher, one_process, tmp_path):
    done = _run([*LAUNCHERS[launcher](), *PINNED, "-o", "out"], tmp_path)
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


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
# torchrun only: how the ranks start is the data-parallel test's (both launchers); once they run,
# an accelerate-launched sharded search is the same code (CI time: ~30 s a launch)
@pytest.mark.parametrize("launcher", ["torchrun"])
def test_sharded_two_rank_cli_holds_half_the_layers_and_finds_the_one_process_architecture(
    launcher, one_process, tmp_path
):
    done = _run([*LAUNCHERS[launcher](), *PINNED, "-o", "out", "--shard"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert done.stdout.count("saved to") == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["search"]["processes"] == 2 and report["search"]["sharded"]
    assert report["architecture"] == one_process["architecture"]
    assert report["params"] == one_process["params"]
    # each rank held half of every decoder layer and the whole embedding (tied head) and final norm
    before = report["params"]["before"]
    replicated = before - report["params"]["non_embedding_before"] + 64  # embedding + final norm (hidden 64)
    assert report["search"]["rank_weight_bytes"] == 4 * (replicated + (before - replicated) // 2)


def _uneven_model(folder: Path) -> Path:
    """A random Llama whose every sharded dimension is odd (uneven FSDP shards), stories tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=48,
        intermediate_size=87,
        num_attention_heads=6,
        num_key_value_heads=3,
        num_hidden_layers=3,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "uneven")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder / "uneven")
    return folder / "uneven"


@pytest.mark.slow
# "auto": the default, a lora search on task+kd (the dense targets taken by the sharded layers, the
# adapters merged into each rank's rows); joint: every weight trains, FSDP averaging the sharded grads.
# (A structure search, the loaded weights sliced, is the lora path without adapters and teacher.)
@pytest.mark.parametrize("mode", ["auto", "joint"])
def test_sharded_search_equals_the_data_parallel_one_on_uneven_shards(mode, tmp_path):
    require_shared()
    model = _uneven_model(tmp_path)
    pins = ["--mode", "joint", "--loss", "task"] if mode == "joint" else []
    command = [*LAUNCHERS["torchrun"](), "prune", str(model), *PRUNE[2:], *pins, "--no-eval"]
    sharded = _run([*command, "-o", "sharded", "--shard"], tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    plain = _run([*command, "-o", "plain"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("sharded", "plain")]
    assert reports[0]["search"]["sharded"] and not reports[1]["search"]["sharded"]
    resolved = {"auto": ("lora", "task+kd"), "joint": ("joint", "task")}[mode]
    for report in reports:
        assert (report["settings"]["search"]["mode"], report["settings"]["search"]["loss"]) == resolved
    assert reports[0]["architecture"] == reports[1]["architecture"]
    assert reports[0]["search"]["history"] == reports[1]["search"]["history"]
    # --dry-run's per-rank figure is what FSDP gave the main rank on these uneven rows
    planned = prune_plan(str(model), PruneConfig(ratio=0.3)).shard_rank_bytes[2]
    assert reports[0]["search"]["rank_weight_bytes"] == planned
    a, b = _weights(tmp_path / "sharded"), _weights(tmp_path / "plain")
    assert sorted(a) == sorted(b)
    for key in a:  # trained (merged) weights equal the data-parallel ranks', bit for bit
        assert (a[key] == b[key]).all(), key
    # and they were trained: a kept layer's down_proj is not the base model's kept columns
    arch, base = reports[0]["architecture"], _weights(model)
    last = arch["kept_layers"][-1]
    original = base[f"model.layers.{last}.mlp.down_proj.weight"][:, arch["kept_channels"][last]]
    trained = a[f"model.layers.{len(arch['kept_layers']) - 1}.mlp.down_proj.weight"]
    assert trained.shape == original.shape and (trained - original).abs().max() > 1e-3


def test_shard_needs_several_processes_and_refuses_a_joint_resume(tmp_path):
    require_shared()
    alone = _run([sys.executable, "-m", "dms_llm", *PRUNE, "-o", "out", "--shard"], tmp_path)
    assert alone.returncode == 2 and "launch with torchrun or accelerate launch" in alone.stderr
    resumed = _run([*LAUNCHERS["torchrun"](), *PRUNE, "-o", "out", "--shard", "--mode", "joint", "--resume"], tmp_path)
    assert resumed.returncode != 0
    # the rank's one line (torchrun adds its own report of the failed child)
    assert "dms-llm: error: a sharded joint search keeps no resumable state" in resumed.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_fsdp_launch_for_a_whole_model_is_refused():
    # accelerate only reports FSDP on GPUs, so a stand-in accelerator plays the launched rank
    from accelerate import DistributedType

    from dms_llm.errors import DMSError
    from dms_llm.launch import check_distributed

    class FsdpRank:
        distributed_type = DistributedType.FSDP

    with pytest.raises(DMSError, match="load it with dms_llm.load_sharded"):
        check_distributed(FsdpRank())
    check_distributed(FsdpRank(), sharded=True)  # a sharded model is what FSDP asks for


def test_check_pruned_fits_needs_the_pruned_weights_and_headroom_on_the_main_gpu():
    from dms_llm.errors import DMSError
    from dms_llm.sharding import check_pruned_fits

    check_pruned_fits(10**12, None, "the held-out perplexity")  # on the host: no GPU limit
    check_pruned_fits(10**9, 2 * 10**9, "the held-out perplexity")
    with pytest.raises(DMSError, match=r"\(112\.0 GB\).*\(60\.0 GB free.*held-out perplexity.*--no-eval.*--device-map"):
        check_pruned_fits(112 * 10**9, 60 * 10**9, "the held-out perplexity")  # Llama-2-70B at 0.2, bf16
    with pytest.raises(DMSError, match="will not fit"):
        check_pruned_fits(10**9, 10**9, "LoRA recovery")  # the weights alone, no room for activations


class _SearchReached(Exception):
    pass


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ([], "the held-out perplexity"),  # the defaults evaluate the pruned model on main
        (["eval.heldout=false"], None),
        (["eval.heldout=false", "recover.method=lora"], "LoRA recovery"),
        (["eval.heldout=false", f"eval.ppl={TINYSTORIES}"], "--ppl/--tasks"),
    ],
)
def test_a_sharded_prune_too_big_for_main_gpu_is_refused_before_any_work(monkeypatch, settings, refused):
    """A sharded 70B prune evaluates and recovers the pruned model whole on the main rank's GPU: one
    larger than that GPU used to fail there after the whole search. The pipeline (each rank calling
    it with main's free memory) refuses at once instead; without evaluation or recovery it goes on."""
    require_shared()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dms_llm.pipeline as pipeline
    import dms_llm.sharding as sharding
    from dms_llm.config import PruneConfig, apply_overrides
    from dms_llm.errors import DMSError

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    monkeypatch.setattr(pipeline, "is_sharded", lambda _: True)
    monkeypatch.setattr(sharding, "device_free_bytes", lambda _: 100_000)  # the pruned model needs ~0.8 MB

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the dense model was evaluated before the refusal")

    def search_reached(*args, **kwargs):
        raise _SearchReached

    monkeypatch.setattr(pipeline, "perplexity", no_evaluation)
    monkeypatch.setattr(pipeline, "_search", search_reached)
    base = [f"data.calib={TINYSTORIES}", "data.num_blocks=16", "search.loss=task"]
    config = apply_overrides(PruneConfig(ratio=0.25), base + settings)
    if refused is None:
        with pytest.raises(_SearchReached):
            pipeline.prune(model, tokenizer, config, progress=False)
    else:
        with pytest.raises(DMSError, match=rf"\(0\.0 GB free beside its shard\), where {refused}.*--no-eval"):
            pipeline.prune(model, tokenizer, config, progress=False)


@pytest.mark.slow
def test_main_rank_gathers_only_the_kept_layers_each_sliced_before_the_next(tmp_path):
    """After a sharded search the main rank's host holds the pruned model plus one whole layer at
    most: each kept layer is gathered and sliced before the next, a dropped layer is never gathered,
    and the result equals the whole checkpoint sliced by ``slice_model``, bit for bit."""
    require_shared()
    model, out = _uneven_model(tmp_path), tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).with_name("gather_worker.py")
    torchrun = LAUNCHERS["torchrun"]()[:-2]  # a script, not -m dms_llm
    done = _run([*torchrun, str(worker), str(model), str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    main, other = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    kept = main["architecture"]["kept_layers"]
    assert kept == [0, 2]  # layer 1 dropped
    expected, gathers = [], []
    for event in main["events"]:
        if event[0] == "gather":
            gathers.append(event[1])
        else:  # a slice closes exactly one whole layer's gathers
            expected.append((event[1], sum(gathers)))
            gathers = []
    assert gathers == []
    assert expected == [(i, main["dense_layer_numel"][i]) for i in kept]
    # the other rank takes part in the same gathers (they are collectives) and slices nothing
    assert other["events"] == [e for e in main["events"] if e[0] == "gather"]
    with safe_open(out / "gathered.safetensors", "pt") as a, safe_open(out / "sliced.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # noqa: SIM118 (a safetensors handle)
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    configs = main["config"]
    for key in ("num_hidden_layers", "dms_layer_shapes", "auto_map", "num_key_value_heads", "intermediate_size"):
        assert configs["gathered"].get(key) == configs["sliced"].get(key), key


SINGLE_PROCESS = {  # verb -> its arguments (each would write "out" or "out.gguf")
    "recover": ["recover", str(STORIES), "--data", str(TINYSTORIES), "--steps", "4", "-o", "out", "--quiet"],
    "eval": ["eval", str(STORIES), "--ppl", str(TINYSTORIES), "--output", "out.json"],
    "export": ["export", str(STORIES), "-o", "out.gguf", "--outtype", "f32"],
}


@pytest.mark.parametrize("verb", sorted(SINGLE_PROCESS))
def test_verbs_that_run_in_one_process_refuse_launched_ranks_with_one_line(tmp_path, verb):
    # before, each rank ran the whole job and raced for the output: recover's second rank failed with
    # "another dms-llm run is writing 'out'", torchrun stopped the first, and nothing was written
    require_shared()
    done = _run([*LAUNCHERS["torchrun"](), *SINGLE_PROCESS[verb]], tmp_path)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("dms-llm: error:")]
    assert len(errors) == 1, done.stderr[-3000:]  # said once, by rank 0
    assert errors[0].startswith(f"dms-llm: error: `dms-llm {verb}` runs in one process, but it was launched as 2")
    assert "dms_llm/" not in done.stderr  # no traceback from inside dms-llm (torchrun prints its own)
    assert list(tmp_path.iterdir()) == []
