"""Text sources, calibration blocks and perplexity."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import TINYSTORIES, make_tiny, require_shared

from dms_llm.config import DataConfig
from dms_llm.data import calibration_blocks, format_instruction, load_text, split_blocks, tokenize_text
from dms_llm.errors import DMSError
from dms_llm.evaluate import perplexity


class CharTokenizer:
    """A stand-in tokenizer: one id per character (mod 128), BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 126 for c in text]}


def test_local_txt_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert load_text(str(tmp_path / "c.parquet"), text_field="body") == "x\n\ny"


def test_alpaca_style_rows_are_formatted(tmp_path):
    row = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    (tmp_path / "alpaca.jsonl").write_text(json.dumps(row) + "\n")
    text = load_text(str(tmp_path / "alpaca.jsonl"))
    assert text == format_instruction(row)
    assert "### Instruction:\nAdd" in text and "### Input:\n2 and 3" in text and text.endswith("### Response:\n5")


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty.txt").write_text("") and p / "empty.txt" or p / "empty.txt", "contains no text"),
        (lambda p: (p / "rows.jsonl").write_text('{"body": "x"}\n') and p / "rows.jsonl", "no 'text' field"),
        (lambda p: (p / "bad.jsonl").write_text("{not json}\n") and p / "bad.jsonl", "line 1 is not valid JSON"),
        (lambda p: (p / "data.csv").write_text("a,b\n") and p / "data.csv", "unsupported text file"),
    ],
)
def test_bad_sources_give_clear_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DMSError, match=message):
        load_text(str(path))


def test_unknown_named_source_suggests_names():
    with pytest.raises(DMSError, match="Did you mean 'wikitext2'"):
        load_text("wikitext")


def test_calibration_blocks_are_seeded_non_overlapping_and_hold_out_the_tail(tmp_path):
    generator = torch.Generator().manual_seed(0)
    text = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (5000,), generator=generator))
    (tmp_path / "t.txt").write_text(text)
    config = DataConfig(calib=str(tmp_path / "t.txt"), num_blocks=20, seq_len=50, heldout_fraction=0.2)
    first = calibration_blocks(CharTokenizer(), config, seed=3)
    again = calibration_blocks(CharTokenizer(), config, seed=3)
    other = calibration_blocks(CharTokenizer(), config, seed=4)
    assert first.calib.shape == (20, 50)
    assert torch.equal(first.calib, again.calib) and not torch.equal(first.calib, other.calib)
    stream = tokenize_text(CharTokenizer(), text)
    assert first.heldout.numel() == int(stream.numel() * 0.2)
    assert torch.equal(first.heldout, stream[-first.heldout.numel() :])
    windows = split_blocks(stream[: stream.numel() - first.heldout.numel()], 50)
    rows = {tuple(r.tolist()) for r in windows}
    assert all(tuple(block.tolist()) in rows for block in first.calib)  # whole aligned windows, no overlap
    assert len({tuple(b.tolist()) for b in first.calib}) == 20


def test_calibration_text_shorter_than_a_block_is_rejected(tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DMSError, match="fewer than one block of 128"):
        calibration_blocks(CharTokenizer(), DataConfig(calib=str(tmp_path / "short.txt")))


def test_perplexity_matches_an_independent_computation():
    model = make_tiny("llama_gqa")
    tokens = torch.randint(0, 128, (1000,), generator=torch.Generator().manual_seed(0))
    seq_len = 64
    # independent: transformers' own shifted loss, one window at a time, averaged over tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 1000 - seq_len + 1, seq_len):
            window = tokens[start : start + seq_len].unsqueeze(0)
            total += model(window, labels=window).loss.item() * (seq_len - 1)
            count += seq_len - 1
    expected = math.exp(total / count)
    assert perplexity(model, tokens, seq_len=seq_len, batch_size=3) == pytest.approx(expected, rel=1e-5)
    # and by hand from the logits for the first window
    with torch.no_grad():
        logits = model(tokens[:seq_len].unsqueeze(0)).logits[0]
    manual = F.cross_entropy(logits[:-1], tokens[1:seq_len]).exp().item()
    assert perplexity(model, tokens[:seq_len], seq_len=seq_len) == pytest.approx(manual, rel=1e-5)


def test_stories260k_perplexity_on_tinystories_is_low(stories):
    require_shared()
    model, tokenizer = stories
    tokens = tokenize_text(tokenizer, load_text(str(TINYSTORIES)))[:20_000]
    assert tokens[0].item() == tokenizer.bos_token_id
    ppl = perplexity(model, tokens, seq_len=256)
    assert 3.0 < ppl < 6.0  # the data README: about 4.1 at 256-token windows


@pytest.mark.parametrize(
    "name,role,expected",
    [
        ("wikitext2", "train", ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", {})),
        ("wikitext2", "test", ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", {})),
        (
            "c4",
            "validation",
            (
                "allenai/c4",
                None,
                "validation",
                {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
            ),
        ),
        ("ptb", "test", ("ptb-text-only/ptb_text_only", "penn_treebank", "test", {"revision": "refs/convert/parquet"})),
    ],
)
def test_named_sources_call_datasets_with_the_right_arguments(monkeypatch, name, role, expected):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(
            [{"text": "first row", "sentence": "a sentence"}, {"text": "second", "sentence": "b"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text = load_text(name, split=role)
    assert calls == [expected]
    expected_text = {"ptb": "a sentence b", "c4": "first row second"}.get(name, "first row\n\nsecond")
    assert text == expected_text


def test_named_source_failures_are_one_clear_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DMSError, match=r"could not load dataset 'wikitext2'.*Offline\? Pass a local") as error:
        load_text("wikitext2")
    assert "\n" not in str(error.value)


def test_named_calibration_sources_are_read_only_as_far_as_needed(monkeypatch):
    import datasets

    rows = [{"text": "x" * 1000} for _ in range(5000)]  # 5M characters on offer
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    seen = []
    tokenizer = CharTokenizer()
    original = tokenizer.__call__

    class Counting(CharTokenizer):
        def __call__(self, text, add_special_tokens=False):
            seen.append(len(text))
            return original(text, add_special_tokens)

    data = calibration_blocks(Counting(), DataConfig(calib="c4", num_blocks=10, seq_len=100, heldout_fraction=0.1))
    assert data.calib.shape == (10, 100)
    assert seen[0] < 30_000  # ~1,112 tokens needed: a few documents are tokenised, not 5,000
