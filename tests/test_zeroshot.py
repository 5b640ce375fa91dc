"""lm-eval zero-shot plumbing from local task files, and the eval command line."""

import json

import pytest
import torch
from conftest import SHARED_DATA, STORIES, TINYSTORIES, require_shared
from test_cli import dms_llm

from dms_llm.errors import DMSError
from dms_llm.zeroshot import STANDARD_TASKS, parse_tasks, write_local_task_configs, zero_shot

TASKS = SHARED_DATA / "tasks"


def manual_arc_accuracy(model, tokenizer, rows) -> float:
    """arc_easy accuracy by hand: argmax over choices of the continuation's summed log-likelihood."""
    correct = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        context_ids = tokenizer.encode(context)
        scores = []
        for choice in row["choices"]["text"]:
            whole = tokenizer.encode(context + " " + choice)
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole))))
        correct += int(
            max(range(len(scores)), key=scores.__getitem__) == row["choices"]["label"].index(row["answerKey"])
        )
    return correct / len(rows)


def test_local_arc_easy_matches_an_independent_loglikelihood_computation(stories):
    require_shared()
    model, tokenizer = stories
    result = zero_shot(model, tokenizer, ["arc_easy"], limit=24, task_data=TASKS)
    rows = [json.loads(line) for line in (TASKS / "arc_easy.test.jsonl").read_text().splitlines()[:24]]
    arc = result["tasks"]["arc_easy"]
    assert arc["samples"] == 24
    assert arc["acc"] == pytest.approx(manual_arc_accuracy(model, tokenizer, rows))
    import lm_eval

    assert result["lm_eval_version"] == lm_eval.__version__
    assert result["source"] == "local files"


def test_every_standard_task_runs_from_local_files(stories):
    require_shared()
    model, tokenizer = stories
    result = zero_shot(model, tokenizer, ["default"], limit=6, task_data=TASKS)
    assert list(result["tasks"]) == list(STANDARD_TASKS)
    for task, row in result["tasks"].items():
        assert row["samples"] == 6, task
        assert 0.0 <= row["acc"] <= 1.0
        assert row["version"] is not None
        if task not in ("boolq", "winogrande"):  # these two report acc only in lm-eval
            assert 0.0 <= row["acc_norm"] <= 1.0


def test_task_names_and_files_are_checked(tmp_path):
    assert parse_tasks("default,boolq") == list(STANDARD_TASKS)
    assert parse_tasks("arc_easy, boolq") == ["arc_easy", "boolq"]
    with pytest.raises(DMSError, match="does not exist"):
        write_local_task_configs(["boolq"], tmp_path / "nowhere", tmp_path)
    with pytest.raises(DMSError, match="boolq.validation.jsonl' is missing"):
        write_local_task_configs(["boolq"], tmp_path, tmp_path)
    with pytest.raises(DMSError, match="no local file layout known for task 'mmlu'"):
        write_local_task_configs(["mmlu"], tmp_path, tmp_path)


@pytest.mark.slow
def test_eval_command_prints_perplexities_and_a_zero_shot_table(tmp_path):
    require_shared()
    out = tmp_path / "eval.json"
    # the first 200,000 characters of WikiText-2 test (the whole file's perplexity is half this test's time)
    wikitext = tmp_path / "wiki.test.raw.txt"
    wikitext.write_text((SHARED_DATA / "text" / "wikitext2" / "wiki.test.raw.txt").read_text()[:200_000])
    result = dms_llm(
        "eval",
        str(STORIES),
        "--ppl",
        f"{wikitext},{TINYSTORIES}",
        "--tasks",
        "arc_easy,piqa",
        "--limit",
        "10",
        "--task-data",
        str(TASKS),
        "--seq-len",
        "256",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in (
        "ppl wiki.test.raw (seq 256)",
        "ppl validation_a (seq 256)",
        "arc_easy acc",
        "piqa acc_norm",
        "lm-eval",
    ):
        assert text in result.stdout, text
    saved = json.loads(out.read_text())
    assert saved["params"] == 260_032
    assert 50 < saved["perplexity"]["wiki.test.raw"] < 250  # it only knows children's stories
    assert 3 < saved["perplexity"]["validation_a"] < 8
    assert saved["zero_shot"]["tasks"]["arc_easy"]["samples"] == 10


@pytest.mark.slow
def test_prune_with_eval_reports_dense_and_pruned_side_by_side(tmp_path):
    require_shared()
    out = tmp_path / "pruned"
    result = dms_llm(
        "prune",
        str(STORIES),
        "--ratio",
        "0.3",
        "--calib",
        str(TINYSTORIES),
        "-o",
        str(out),
        "--quiet",
        "--eval-ppl",
        str(TINYSTORIES),
        "--eval-tasks",
        "arc_easy",
        "--eval-limit",
        "8",
        "--task-data",
        str(TASKS),
        "search.steps=40",
        "data.num_blocks=64",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dense" in result.stdout and "pruned" in result.stdout and "arc_easy acc" in result.stdout
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["dense"]["params"] == 260_032
    assert evaluation["pruned"]["params"] <= 0.7 * 260_032
    dense, pruned = (evaluation[k]["perplexity"]["validation_a"] for k in ("dense", "pruned"))
    assert dense < pruned
