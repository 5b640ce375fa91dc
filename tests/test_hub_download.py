"""Loading a model by its Hub name downloads what transformers reads, and nothing else.

Mistral's repositories (Mistral-7B-v0.3, Mistral-Nemo, ...) hold the weights twice: the sharded
``model-*.safetensors`` with their index, for transformers, and ``consolidated.safetensors``, for
mistral-inference. The real ``huggingface_hub`` client runs here against a local stand-in for the
Hub that serves such a repository, built from stories260K.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, STORIES, TINYSTORIES, require_shared

from dms_llm.checkpoint import load_model
from dms_llm.model_files import weight_files


def _repository(tmp_path, consolidated_claims: int) -> dict[str, tuple[bytes, int]]:
    """stories260K as a sharded Hub repository, with an extra ``consolidated.safetensors`` copy whose
    listing claims ``consolidated_claims`` bytes."""
    require_shared()
    model, _ = load_model(str(STORIES), dtype="float32")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="200KB")  # two shards and model.safetensors.index.json
    files = {f.name: f.read_bytes() for f in folder.iterdir()}
    files |= {f.name: f.read_bytes() for f in STORIES.iterdir() if f.suffix != ".safetensors"}
    assert "model.safetensors.index.json" in files and sum(n.endswith(".safetensors") for n in files) >= 2
    mistral_names = {f"layers.{i}.attention.wq.weight": torch.zeros(8, 8) for i in range(2)}
    from safetensors.torch import save

    repository = {name: (content, len(content)) for name, content in files.items()}
    repository["consolidated.safetensors"] = (save(mistral_names), consolidated_claims)
    return repository


def test_a_hub_model_downloads_the_index_shards_only_not_a_consolidated_copy(tmp_path):
    from fake_hub import FakeHub

    # the listing claims a 1 PiB consolidated copy: counted, the disk check would refuse the download
    repository = _repository(tmp_path, 2**50)
    with FakeHub(models={"org/mistral-like": repository}) as hub:
        online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
        env = {**os.environ, **online, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
        script = (
            "import json, sys, torch; from dms_llm.checkpoint import load_model; "
            "model, _ = load_model('org/mistral-like', dtype='float32'); "
            "ids = torch.arange(1, 33).unsqueeze(0); "
            "print(json.dumps(model(input_ids=ids).logits.flatten().tolist()))"
        )
        # the user's command first: prune's checks count the cache's room for exactly these files
        cli = [sys.executable, "-m", "dms_llm", "prune", "org/mistral-like", "--ratio", "0.2", "--dry-run"]
        planned = subprocess.run(
            [*cli, "--calib", str(TINYSTORIES), "-o", "out"], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert planned.returncode == 0 and "memory: weights of 'org/mistral-like'" in planned.stdout, planned.stderr
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        fetched = {path.rsplit("/", 1)[-1] for method, path in hub.calls if method == "GET" and "/resolve/" in path}
    # the Hub gone (offline), the same name loads from the cache it filled
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    cached = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=offline, cwd=tmp_path)
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert cached.stdout.splitlines()[-1] == result.stdout.splitlines()[-1]
    shards = set(json.loads(repository["model.safetensors.index.json"][0])["weight_map"].values())
    assert "consolidated.safetensors" not in fetched
    assert len(shards) >= 2 and shards <= fetched
    local, _ = load_model(str(STORIES), dtype="float32")
    expected = local(input_ids=torch.arange(1, 33).unsqueeze(0)).logits.flatten()
    assert torch.equal(torch.tensor(json.loads(result.stdout.splitlines()[-1])), expected)


def test_a_local_folder_reads_the_weights_transformers_reads(tmp_path):
    require_shared()
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.safetensors", "consolidated.safetensors"):
        save_file({"w": torch.zeros(1)}, str(folder / name))
    assert [f.name for f in weight_files(folder)] == ["model.safetensors"]
    (folder / "model.safetensors").unlink()
    (folder / "model-00001-of-00001.safetensors").write_bytes((folder / "consolidated.safetensors").read_bytes())
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [f.name for f in weight_files(folder)] == ["model-00001-of-00001.safetensors"]
    (folder / "model-00001-of-00001.safetensors").unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / "consolidated.safetensors").rename(folder / "weights.safetensors")  # any other naming: all of them
    assert [f.name for f in weight_files(folder)] == ["weights.safetensors"]
    (folder / "weights.safetensors").unlink()
    with pytest.raises(Exception, match="no safetensors weights"):
        weight_files(folder)
