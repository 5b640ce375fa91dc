"""The README's generated blocks match what the code and the benchmarks give now."""

import importlib.util

from conftest import ROOT, require_shared


def update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "eval" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_tables_are_the_results_files():
    # every results table as eval/update_readme.py writes it; the prune example is checked by
    # test_cli's end-to-end test, which runs that very command
    require_shared()
    module = update_readme()
    readme = (ROOT / "README.md").read_text()
    keys = [match["key"] for match in module.BLOCK.finditer(readme)]
    assert "prune-example" in keys and sum(key.startswith("results/") for key in keys) >= 9
    assert module.check(readme, example=False) == []
