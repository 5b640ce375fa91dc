"""Every bad input to every verb: one ``dms-llm: error:`` line, a non-zero exit, nothing written.

The CLI's ``main`` runs in this process (an exception escaping it is the traceback a user would
see), in a scratch folder that is the current directory; the folder's tree is compared before and
after each case, hidden files included.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import transformers
from conftest import STORIES, TINYSTORIES, require_shared

from dms_llm.cli import main

NOT_CACHED = "is not a local folder nor in the local Hugging Face cache"
TOO_BIG = "1.48 TiB in float32, more than the"  # and "... GiB this machine has available (memory and free swap)"
STORY_TEXT = "Once upon a time there was a little girl who liked to play in the park with her dog.\n"


def _workspace(root: Path) -> None:
    """Hostile inputs, built once per test in ``root``."""
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(root / "gpt2")
    (root / "noconfig").mkdir()
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text("{not json")
    corrupt = root / "corrupt"
    shutil.copytree(STORIES, corrupt)
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 3])  # killed mid-download
    text = root / "text"
    text.mkdir()
    (text / "empty.txt").touch()
    (text / "short.txt").write_text("Once upon a time.\n")
    (text / "random.txt").write_bytes(os.urandom(1 << 16))
    (text / "calib.bin").write_bytes(STORY_TEXT.encode() * 400)
    (text / "nofield.jsonl").write_text("".join(json.dumps({"content": STORY_TEXT}) + "\n" for _ in range(400)))
    (text / "broken.jsonl").write_text('{"text": "Once upon\n')
    (text / "latin1.txt").write_bytes(("Caf\xe9 " * 5000).encode("latin-1"))
    (root / "afile").write_text("not a folder")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own notes")
    (root / "bad.yaml").write_text("search: [1, 2\n")
    (root / "typo.yaml").write_text("serch:\n  steps: 3\n")
    (root / "wrongtype.yaml").write_text("search:\n  steps: many\n")
    (root / "exists.gguf").write_text("an older export")
    huge = root / "llama-405b"  # Llama-3.1-405B's shape: 1.48 TiB in float32, more than any test machine holds
    huge.mkdir()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(STORIES / name, huge / name)
    transformers.LlamaConfig(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
    ).save_pretrained(huge)  # fmt: skip


def _prune(*extra: str, model: str | None = None, calib: str | None = None) -> list[str]:
    return ["prune", model or str(STORIES), "--calib", calib or str(TINYSTORIES), "-o", "out", *extra]


PRUNE = [  # (argv, what the error line must say)
    (_prune("--ratio", "1.5"), "--ratio must be between 0 and 1"),
    (_prune("--ratio", "0"), "--ratio must be between 0 and 1"),
    (_prune("--ratio", "-0.2"), "--ratio must be between 0 and 1"),
    (_prune("--ratio", "abc"), "invalid float value: 'abc'"),
    (_prune("--ratio", "0.99"), "largest reachable ratio"),
    (_prune("--ratio", "0.2", "--params", "100K"), "either --ratio or --params"),
    (_prune("--params", "10M"), "must be below the model's 260,032 parameters"),
    (_prune("--params", "0"), "--params 0 must be below"),
    (_prune("--params", "lots"), "cannot read parameter count 'lots'"),
    (_prune("--ratio", "0.2", model="no-such-folder/model"), NOT_CACHED),
    (_prune("--ratio", "0.2", model="noconfig"), "has no config.json"),
    (_prune("--ratio", "0.2", model="gpt2"), "model type 'gpt2' is not supported"),
    (_prune("--ratio", "0.2", model="badjson"), "could not load the config"),
    (_prune("--ratio", "0.2", calib="text/missing.txt"), "does not exist"),
    (_prune("--ratio", "0.2", calib="text/empty.txt"), "is empty"),
    (_prune("--ratio", "0.2", calib="text/calib.bin"), "unsupported text file 'calib.bin'"),
    (_prune("--ratio", "0.2", calib="text/nofield.jsonl"), "has no 'text' field"),
    (_prune("--ratio", "0.2", calib="text/broken.jsonl"), "line 1"),
    (_prune("--ratio", "0.2", calib="text/short.txt"), "fewer than one block of 128"),
    (_prune("--ratio", "0.2", calib="text/random.txt"), "is not text"),
    (_prune("--ratio", "0.2", calib="text/latin1.txt"), "not UTF-8"),
    (_prune("--ratio", "0.2", calib="text"), "is a folder"),
    (_prune("--ratio", "0.2", "--targets", "heads,neurons"), "neurons"),
    (_prune("--ratio", "0.2", "--layout", "diagonal"), "--layout must be per_layer or uniform"),
    (_prune("--ratio", "0.2", "--recipe", "no-such-recipe"), "no recipe named 'no-such-recipe'"),
    (_prune("--ratio", "0.2", "--recipe", "bad.yaml"), "not valid YAML"),
    (_prune("--ratio", "0.2", "--recipe", "typo.yaml"), "Did you mean 'search'"),
    (_prune("--ratio", "0.2", "--recipe", "wrongtype.yaml"), "search.steps"),
    (_prune("--ratio", "0.2", "search.stepz=3"), "unknown setting 'search.stepz'. Did you mean 'steps'?"),
    (_prune("--ratio", "0.2", "search.steps=many"), "search.steps' must be int"),
    (_prune("--ratio", "0.2", "extra-word"), "extra-word"),
    (_prune("--ratio", "0.2", "--steps", "0"), "steps"),
    (_prune("--ratio", "0.2", "--batch-size", "0"), "batch_size"),
    (_prune("--ratio", "0.2", "--seq-len", "0"), "seq_len"),
    (_prune("--ratio", "0.2", "--num-blocks", "0"), "num_blocks"),
    (_prune("--ratio", "0.2", "--lr", "-1"), "lr"),
    (_prune("--ratio", "0.2", "--dtype", "float8"), "float8"),
    (_prune("--ratio", "0.2", "--device", "tpu"), "unknown device 'tpu'"),
    (_prune("--ratio", "0.2", "--device", "cuda"), "no CUDA GPU"),
    (_prune("--ratio", "0.2", "--mode", "sideways"), "sideways"),
    (_prune("--ratio", "0.2", "--method", "sparsegpt"), "--method must be one of dms, magnitude"),
    (_prune("--ratio", "0.2", "--method", "flap", "--layout", "uniform"), "FLAP allocates per layer"),
    (_prune("--ratio", "0.2", "--method", "taylor", "--channel-multiple", "8"), "does not take --channel-multiple"),
    (_prune("--ratio", "0.2", "--loss", "mse"), "search.loss must be one of auto, task, kd, task+kd"),
    (_prune("--ratio", "0.2", "--loss", "kd", "search.distill_weight=0"), "needs search.distill_weight > 0"),
    (_prune("--ratio", "0.2", "--channel-multiple", "0"), "--channel-multiple must be a whole number >= 1"),
    (_prune("--ratio", "0.2", "--channel-multiple", "4096"), "--channel-multiple"),
    (_prune("--ratio", "0.2", "-o", "afile/sub"), "is a file, not a folder"),
    (_prune("--ratio", "0.2", "-o", ".", "--overwrite"), "current folder"),
    (_prune("--ratio", "0.2", "-o", "mine"), "already exists"),
    (_prune("--ratio", "0.2", "-o", "mine", "--overwrite"), "only replaces folders written by dms-llm"),
    (_prune("--ratio", "0.2", "--eval-ppl", "missing.txt"), "text file 'missing.txt' does not exist"),
    (_prune("--ratio", "0.2", "--eval-tasks", "boolq", "--task-data", "nope"), "task data folder 'nope'"),
    (_prune("--ratio", "0.2", "--recover", "qlora"), "qlora"),
    (_prune("--ratio", "0.2", "--recover", "lora", "recover.save_every=10"), "applies to `dms-llm recover` only"),
    (_prune("--ratio", "0.2", "--recover", "lora", "--recover-data", "nope.jsonl"), "'nope.jsonl' does not exist"),
    (_prune("--ratio", "0.2", "--shard"), "launch with torchrun or accelerate launch"),
    (_prune("--ratio", "0.2", "--mode", "lora", "search.lora_r=0"), "search.lora_r >= 1"),
    (_prune("--ratio", "0.2", "--eval-seq-len", "0"), "seq_len"),
    (_prune("--ratio", "0.2", "--push-to-hub", "not a repo id"), "not a valid Hub repository id"),
    (_prune("--ratio", "0.2", model="corrupt"), "truncated or corrupt safetensors"),
    (_prune("--ratio", "0.2", model="llama-405b"), TOO_BIG),
    (_prune("--ratio", "0.2", "--dry-run", model="llama-405b"), TOO_BIG),
]

OTHER_VERBS = [
    (["eval", "no-such-folder/model"], NOT_CACHED),
    (["eval", "corrupt", "--ppl", str(TINYSTORIES)], "truncated or corrupt safetensors"),
    (["eval", str(STORIES), "--ppl", "missing.txt"], "'missing.txt' does not exist"),
    (["eval", str(STORIES), "--ppl", "text/random.txt"], "is not text"),
    (["eval", str(STORIES), "--seq-len", "0"], "seq_len"),
    (["eval", str(STORIES), "--batch-size", "0"], "batch_size"),
    (["eval", str(STORIES), "--ppl", str(TINYSTORIES), "--output", "afile/eval.json"], "is a file, not a folder"),
    (["recover", "no-such-folder"], NOT_CACHED),
    (["recover", "corrupt", "--data", str(TINYSTORIES), "-o", "out"], "truncated or corrupt safetensors"),
    (["recover", str(STORIES), "--data", str(TINYSTORIES), "--distill", "-o", "out"], "--distill needs the dense"),
    (["recover", str(STORIES), "--distill", "--teacher", "nope/nope", "-o", "out"], NOT_CACHED),
    (["recover", str(STORIES), "--data", "missing.txt", "-o", "out"], "'missing.txt' does not exist"),
    (["recover", str(STORIES), "--data", str(TINYSTORIES), "--steps", "0", "-o", "out"], "steps"),
    (["recover", str(STORIES), "--data", str(TINYSTORIES), "--lora-r", "0", "-o", "out"], "lora_r"),
    (["recover", str(STORIES), "--data", str(TINYSTORIES), "-o", "mine"], "already exists"),
    (["recover", str(STORIES), "--data", str(TINYSTORIES), "-o", "out", "--resume"], "holds no adapter checkpoint"),
    (["push", "no-such-folder", "user/model"], "does not exist"),
    (["eval", "./no-such-folder"], "model folder './no-such-folder' does not exist"),
    (["push", str(STORIES), "not a repo id"], "not a valid Hub repository id"),
    (["export", "no-such-folder"], "does not exist"),
    (["export", str(STORIES), "--outtype", "q4", "-o", "x.gguf"], "q4"),
    (["export", str(STORIES), "-o", "exists.gguf"], "already exists"),
    (["export", str(STORIES), "-o", "afile/x.gguf"], "is a file, not a folder"),
    (["export", "corrupt", "-o", "x.gguf"], "truncated or corrupt safetensors"),
    (["export", "gpt2", "-o", "x.gguf"], "gpt2"),
    (["eval", "llama-405b", "--ppl", str(TINYSTORIES)], TOO_BIG),
    (["recover", "llama-405b", "--data", str(TINYSTORIES), "-o", "out"], TOO_BIG),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


def _tree(root: Path) -> dict[str, float]:
    return {str(path.relative_to(root)): path.stat().st_mtime for path in root.rglob("*")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_shared()
    root = tmp_path_factory.mktemp("hostile")
    _workspace(root)
    return root


def _case_id(argv: list[str]) -> str:
    short = {str(STORIES): "stories", str(TINYSTORIES): "tinystories"}
    return " ".join(short.get(word, word) for word in argv if word not in ("-o", "out", "--calib"))


CASES = [pytest.param(argv, message, id=_case_id(argv)) for argv, message in PRUNE + OTHER_VERBS]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_bad_input_is_one_line_and_writes_nothing(workspace, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(workspace)
    before = _tree(workspace)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"accepted: {out[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("dms-llm"), err
    assert "error: " in lines[0] and message in lines[0], lines[0]
    assert _tree(workspace) == before  # nothing written, nothing removed
    if "corrupt" not in message:  # every other case is refused before a weight is read
        assert "loading " not in out
