"""The quality benchmark's rows are valid recipes, and its committed results are those rows.

A row with a misspelt setting would otherwise fail only after the benchmark's first half hour.
"""

import json

import pytest
from conftest import ROOT, load_eval_script

from dms_llm.config import PruneConfig, apply_overrides

ROWS = load_eval_script("benchmark_quality").ROWS


@pytest.mark.parametrize("label", list(ROWS))
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_every_row_is_a_valid_prune_config(label, ratio):
    config = apply_overrides(PruneConfig(ratio=ratio, seed=0), ROWS[label]).validate()
    # each row runs the method, mode and loss its label names
    settings = dict(item.split("=", 1) for item in ROWS[label])
    if "method" in settings:
        assert config.method == settings["method"] != "dms"
    else:
        assert config.method == "dms"
        assert config.search.mode == settings.get("search.mode", PruneConfig().search.mode)
        assert config.search.loss == settings.get("search.loss", PruneConfig().search.loss)


def test_committed_quality_results_cover_every_row_ratio_and_seed():
    results = json.loads((ROOT / "eval" / "results" / "quality.json").read_text())
    units = {(row["row"], row["ratio"], row["seed"]) for row in results["rows"]}
    expected = {(label, ratio, seed) for label in ROWS for ratio in (0.2, 0.3, 0.5) for seed in (0, 1, 2)}
    assert units == expected
    assert len(results["rows"]) == len(expected)  # no unit twice (a merge of overlapping runs)
