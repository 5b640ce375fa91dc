"""The dms-llm command line, end to end on stories260K, and its errors on bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import transformers
import yaml
from conftest import ROOT, STORIES, TINYSTORIES, load_eval_script, require_shared

from dms_llm.checkpoint import load_pruned
from dms_llm.cli import _prune_config, build_parser
from dms_llm.config import PruneConfig, RecoverConfig, available_recipes, load_recipe
from dms_llm.errors import DMSError


def dms_llm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dms_llm", *args], capture_output=True, text=True, env=env, cwd=cwd or ROOT
    )


def verb_parsers() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def prune_args(argv):
    return _prune_config(verb_parsers()["prune"].parse_intermixed_args(argv))


@pytest.mark.slow
def test_prune_end_to_end_on_stories260k(tmp_path):
    # the README's example command, at the defaults; its sizes (kept layers, heads and channels in
    # all, parameters) must be the README's; which nearly tied heads a layer keeps depends on the CPU
    require_shared()
    readme_tool = load_eval_script("update_readme")
    out = tmp_path / "pruned"
    result = dms_llm(*readme_tool.PRUNE_ARGS, "--output-dir", str(out))
    shown = next(m["body"] for m in readme_tool.BLOCK.finditer((ROOT / "README.md").read_text())
                 if m["key"] == "prune-example")  # fmt: skip
    assert readme_tool.sizes(result.stdout) == readme_tool.sizes(shown), result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity (validation_a.txt, held-out tail, seq 256): dense" in result.stdout
    assert f"saved to {out}" in result.stdout
    report = json.loads((out / "report.json").read_text())
    params = report["params"]
    assert params["after"] <= params["target"] == int(0.8 * 260_032)
    assert params["target"] - params["after"] <= 0.005 * params["before"]
    assert report["perplexity"]["dense"] < report["perplexity"]["pruned"] < 100
    assert report["command"].startswith("dms-llm prune")
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == params["after"]
    # the base model's tokenizer files, byte for byte (llama.cpp's converter needs tokenizer.model)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (STORIES / name).read_bytes(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    story = tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0], skip_special_tokens=True)
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time") + 20


def test_existing_output_folder_is_refused_without_overwrite(tmp_path):
    require_shared()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = dms_llm("prune", str(STORIES), "--calib", str(TINYSTORIES), "--output-dir", str(out))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_malformed_ratio_is_one_line():
    result = dms_llm("prune", "some/model", "--ratio", "abc")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "invalid float value: 'abc'" in result.stderr


def test_settings_precedence_recipe_then_flags_then_key_value(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ratio": 0.3, "layout": "uniform", "search": {"steps": 11, "lr": 0.5}}))
    config = prune_args(["m", "--recipe", str(recipe), "--steps", "22", "search.lr=0.01"])
    assert (config.ratio, config.layout, config.search.steps, config.search.lr) == (0.3, "uniform", 22, 0.01)
    config = prune_args(["m", "--recipe", str(recipe), "--params", "1.5M"])
    assert config.ratio is None and config.params == "1.5M"
    with pytest.raises(DMSError, match="either --ratio or --params"):
        prune_args(["m", "--ratio", "0.2", "--params", "5B"])
    with pytest.raises(DMSError, match="search.steps' must be int"):
        prune_args(["m", "search.steps=many"])


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_recipe_validates(name):
    config = load_recipe(name)
    assert isinstance(config, PruneConfig)
    config.validate()
    header = available_recipes()[name].read_text().splitlines()[0]
    assert header.startswith("# "), "a recipe starts with a comment saying what it is for"
    assert re.search(r"dms[-_]llm prune", available_recipes()[name].read_text()), "a recipe shows its command"


def test_malformed_recipes_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(DMSError, match="not valid YAML"):
        load_recipe(str(bad))
    bad.write_text("serch:\n  steps: 3\n")
    with pytest.raises(DMSError, match="Did you mean 'search'"):
        load_recipe(str(bad))
    with pytest.raises(DMSError, match="no recipe named 'lama3-8b'"):
        load_recipe("lama3-8b")


def test_recipes_verb_lists_recipes():
    result = dms_llm("recipes")
    assert result.returncode == 0
    assert "stories260k" in result.stdout


def test_importing_dms_llm_loads_no_peft_no_lm_eval_and_no_cuda():
    code = (
        "import sys, torch, dms_llm\n"
        "assert 'peft' not in sys.modules, 'peft imported'\n"
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "clean"


def test_the_size_checked_before_loading_counts_a_tied_head_once():
    # the budget is checked on an empty (meta) model; an untied head there made stories260K 292,800
    # parameters and refused ratios up to 0.86 that the API reaches
    require_shared()
    import transformers

    from dms_llm.adapters import get_adapter
    from dms_llm.budget import ParamCounter, resolve_budget
    from dms_llm.checkpoint import empty_model, load_config

    config = load_config(str(STORIES))
    counted = ParamCounter.from_model(empty_model(config), get_adapter(config))
    real = transformers.AutoModelForCausalLM.from_pretrained(STORIES)
    assert counted.total == sum(p.numel() for p in real.parameters()) == 260_032
    resolve_budget(counted, 0.8, None, ["heads", "channels", "layers"])  # reachable, so not refused


def test_checkpoint_folders_follow_the_umask(tmp_path):
    require_shared()
    result = dms_llm("prune", str(STORIES), "--ratio", "0.2", "--calib", str(TINYSTORIES), "--quiet", "--no-eval",
                     "search.steps=5", "data.num_blocks=64", "-o", "out", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not 700: others may serve it
    files = {file.name: file.stat().st_mode & 0o777 for file in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files  # safetensors writes it 600: others could not load the weights
    assert files == dict.fromkeys(files, 0o666 & ~_umask())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_a_key_value_right_after_prune_is_a_setting_not_the_model():
    config = prune_args(["--recipe", "stories260k", "search.steps=5", "seed=3"])
    assert config.search.steps == 5 and config.seed == 3


def test_the_stories_recipe_runs_from_the_repository_root_with_a_setting_after_it(tmp_path):
    require_shared()
    out = tmp_path / "out"
    settings = ["search.steps=5", "data.num_blocks=64"]
    result = dms_llm("prune", "--recipe", "stories260k", *settings, "--quiet", "--no-eval", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "report.json").read_text())["search"]["steps"] == 5


def test_small_frictions():
    assert prune_args(["m", "--layout", "per-layer"]).layout == "per_layer"
    help_text = " ".join(verb_parsers()["prune"].format_help().split())
    assert "wikitext2 (the default, from the Hub)" in help_text


def test_every_option_of_every_verb_says_what_it_does():
    for verb, parser in verb_parsers().items():
        for action in parser._actions:
            assert action.help, f"dms-llm {verb} {'/'.join(action.option_strings) or action.dest} has no help text"


def test_the_defaults_shown_and_used_are_the_configs_own():
    recover, defaults = verb_parsers()["recover"].parse_args(["model"]), RecoverConfig()
    for key in ("data", "steps", "batch_size", "seq_len", "lr", "lora_r"):
        assert getattr(recover, key) == getattr(defaults, key), key
    recover_help = " ".join(verb_parsers()["recover"].format_help().split())
    assert f"optimizer steps (default {defaults.steps})" in recover_help
    prune_help = " ".join(verb_parsers()["prune"].format_help().split())
    search = PruneConfig().search
    assert f"search steps (default {search.steps})" in prune_help
    assert f"learning rate of the keep ratios (default {search.lr})" in prune_help
    assert "(default heads,channels,layers)" in prune_help
    # flags stay unset unless given, so a recipe's values are not overridden by these defaults
    recipe = load_recipe("stories260k")
    assert recipe.eval.seq_len != PruneConfig().eval.seq_len  # shown as --eval-seq-len's default
    assert prune_args(["m", "--recipe", "stories260k"]).eval.seq_len == recipe.eval.seq_len
