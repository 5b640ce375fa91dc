"""Model card and Hub upload, through the real huggingface_hub client against a local stand-in."""

import hashlib
import os
import subprocess
import sys

import huggingface_hub
import pytest
import yaml
from conftest import ROOT, SHARED_DATA, STORIES, TINYSTORIES, require_shared
from fake_hub import FakeHub

from dms_llm import PruneConfig, prune, save_pruned
from dms_llm.card import model_card
from dms_llm.errors import DMSError
from dms_llm.hub import push_to_hub


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A per-layer pruned stories260K with report.json and eval.json, as `prune --eval` writes it
    (built once: every test only reads it, and the push tests check that they did)."""
    require_shared()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    tmp_path = tmp_path_factory.mktemp("hub")
    config = PruneConfig.from_dict(
        {
            "ratio": 0.3,
            "data": {"calib": str(TINYSTORIES), "num_blocks": 64},
            "search": {"steps": 40},
            "eval": {
                "ppl": [str(TINYSTORIES)],
                "tasks": ["arc_easy"],
                "limit": 6,
                "task_data": str(SHARED_DATA / "tasks"),
                "seq_len": 256,
            },
        }
    )
    model, report = prune(model, tokenizer, config, progress=False)
    report.model = str(STORIES)
    report.command = "dms-llm prune stories260K --ratio 0.3"
    import json

    folder = save_pruned(
        model,
        tokenizer,
        tmp_path / "pruned",
        report=report.to_dict(),
        extra_files={"eval.json": json.dumps(report.evaluation)},
    )
    return folder, report


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_model_card_renders_with_real_numbers(checkpoint):
    folder, report = checkpoint
    card = model_card(folder, "tester/stories-dms30")
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "mit"  # inherited from the base model's LICENSE
    assert front["library_name"] == "transformers" and "dms-llm" in front["tags"]
    assert huggingface_hub.ModelCard(card).data.license == "mit"
    params = report.params
    assert f"{params['before']:,} -> {params['after']:,} parameters" in card
    for row in report.layers:
        if row["kept"]:
            assert f"| {row['layer']} | yes | {row['kv_heads']}/{row['of_kv_heads']} |" in card
        else:
            assert f"| {row['layer']} | dropped |" in card
    dense_ppl = report.evaluation["dense"]["perplexity"]["validation_a"]
    pruned_ppl = report.evaluation["pruned"]["perplexity"]["validation_a"]
    assert f"| perplexity validation_a (seq 256) | {dense_ppl:.2f} | {pruned_ppl:.2f} |" in card
    assert "| arc_easy acc (%) |" in card and "lm-eval" in card
    # the search as it ran: the defaults resolved to lora mode distilled from the dense model
    assert "40 search steps, lora mode (LoRA adapters trained" in card and "cross-entropy + KL" in card
    assert "trust_remote_code=True" in card
    assert "Loads with transformers 4.38 or later, 5.x included." in card  # eval/results/compat.md
    assert "dms-llm prune stories260K --ratio 0.3" in card
    assert "![kept heads and channels per layer](architecture.png)" in card


def test_push_uploads_exactly_the_checkpoint_card_and_plot(checkpoint, monkeypatch):
    folder, _ = checkpoint
    before = digest(folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        url = push_to_hub(
            folder, "tester/stories-dms30", private=True, revision="v1", token="hf_test", endpoint=hub.url
        )
    assert url.endswith("/tester/stories-dms30/commit/" + "a" * 40)
    assert hub.repos["tester/stories-dms30"]["visibility"] == "private"
    assert hub.branches == [("tester/stories-dms30", "v1")]
    (commit,) = hub.commits
    assert commit["revision"] == "v1"
    uploaded = commit["files"]
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(uploaded) == set(local) | {"README.md", "architecture.png"}
    for name, data in local.items():
        assert uploaded[name] == data, name
    assert uploaded["README.md"].decode() == model_card(folder, "tester/stories-dms30")
    assert uploaded["architecture.png"].startswith(b"\x89PNG")
    assert digest(folder) == before  # the local checkpoint was only read


def test_push_without_a_token_is_a_clear_error_and_touches_nothing(checkpoint, monkeypatch):
    folder, _ = checkpoint
    before = digest(folder)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(DMSError, match="no Hugging Face token"):
        push_to_hub(folder, "tester/x")
    assert digest(folder) == before


def test_failed_upload_is_a_clear_error_and_touches_nothing(checkpoint, monkeypatch):
    folder, _ = checkpoint
    before = digest(folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub(fail_commit=True) as hub, pytest.raises(DMSError, match="upload to tester/x failed") as error:
        push_to_hub(folder, "tester/x", token="hf_test", endpoint=hub.url)
    assert "local checkpoint is untouched" in str(error.value) and "\n" not in str(error.value)
    assert digest(folder) == before


def test_push_refuses_bad_folders_and_names(tmp_path):
    with pytest.raises(DMSError, match="no config.json"):
        push_to_hub(tmp_path, "tester/x", token="t")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DMSError, match="no .safetensors"):
        push_to_hub(tmp_path, "tester/x", token="t")
    with pytest.raises(DMSError, match="must look like user/name"):
        push_to_hub(tmp_path, "just-a-name", token="t")


@pytest.mark.slow
def test_push_command_uploads_through_the_configured_endpoint(checkpoint):
    folder, _ = checkpoint
    with FakeHub() as hub:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": "hf_test",
            "PYTHONPATH": str(ROOT),
        }
        result = subprocess.run(
            [sys.executable, "-m", "dms_llm", "push", str(folder), "tester/stories-dms30"],
            capture_output=True,
            text=True,
            env=env,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tester/stories-dms30" in result.stdout
    assert hub.commits and "README.md" in hub.commits[0]["files"]
