"""The README's generated blocks match what the code and the benchmarks give now."""

import importlib.util

from conftest import ROOT, require_shared


def test_readme_blocks_match_the_results_files_and_the_example_reproduces():
    # the example's architecture and size, and every results table, as eval/update_readme.py writes them
    require_shared()
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "eval" / "update_readme.py")
    update_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update_readme)
    readme = (ROOT / "README.md").read_text()
    keys = [match["key"] for match in update_readme.BLOCK.finditer(readme)]
    assert "prune-example" in keys and sum(key.startswith("results/") for key in keys) >= 8
    assert update_readme.check(readme) == []
