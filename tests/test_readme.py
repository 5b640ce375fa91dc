"""The README's generated blocks match what the code and the benchmarks give now."""

from conftest import ROOT, load_eval_script, require_shared


def test_readme_results_tables_are_the_results_files():
    # every results table as eval/update_readme.py writes it; the prune example is checked by
    # test_cli's end-to-end test, which runs that very command
    require_shared()
    module = load_eval_script("update_readme")
    readme = (ROOT / "README.md").read_text()
    keys = [match["key"] for match in module.BLOCK.finditer(readme)]
    assert "prune-example" in keys and sum(key.startswith("results/") for key in keys) >= 9
    assert module.check(readme, example=False) == []
