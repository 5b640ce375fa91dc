"""The peers' one-shot criteria: their statistics against a plain recomputation, and what they keep."""

import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES, make_tiny, require_shared
from transformers import AutoConfig, AutoModelForCausalLM

from dms_llm.adapters import get_adapter
from dms_llm.baselines import activation_norms, fluctuation_statistics, minitron_scores, one_shot
from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.cli import main
from dms_llm.slicing import stock_unit_counts


def _captured_inputs(model, adapter, blocks, batch_size):
    """Every o_proj / down_proj input of every batch, kept whole: (layer, name) -> [(batch, pos, features)]."""
    captured, handles = {}, []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name in ("o", "down"):

            def hook(module, args, key=(index, name)):
                captured.setdefault(key, []).append(args[0].detach().double().clone())

            handles.append(adapter.projection(layer, name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[start : start + batch_size], use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


def test_minitron_and_flap_statistics_equal_a_plain_recomputation():
    model = make_tiny("llama_gqa")
    adapter = get_adapter(model.config)
    blocks = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    captured = _captured_inputs(model, adapter, blocks, batch_size=4)  # batches of 4 and 2 sequences
    norms = activation_norms(model, adapter, blocks, batch_size=4)
    flap = fluctuation_statistics(model, adapter, blocks, batch_size=4)
    for key, batches in captured.items():
        sequences = [sequence for batch in batches for sequence in batch]  # (positions, features) each
        # Minitron: per feature, mean |x| over a sequence's positions, then L2 over the sequences
        means = torch.stack([sequence.abs().mean(dim=0) for sequence in sequences])
        torch.testing.assert_close(norms[key], means.pow(2).sum(0).sqrt().float())
        tokens = torch.cat(sequences)
        torch.testing.assert_close(flap[key][0], tokens.mean(0).float())
        torch.testing.assert_close(flap[key][1], tokens.var(0).float())
    geometry = adapter.geometry(model)
    heads, channels = minitron_scores(model, adapter, norms)
    q_width = geometry.group_size * geometry.head_dim
    for index in range(geometry.num_layers):
        per_unit = norms[(index, "o")].reshape(geometry.units[index], q_width)
        expected = torch.stack([unit.pow(2).sum().sqrt() for unit in per_unit])
        torch.testing.assert_close(heads[index], expected)
        assert torch.equal(channels[index], norms[(index, "down")])


def test_minitron_prunes_the_quiet_units_first_and_keeps_every_layer_at_one_width():
    model = make_tiny("llama_mha")  # 8 KV groups: a 30% cut prunes some
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model)
    quiet_unit, quiet_channels = 1, [5, 17, 40]
    unit_rows = slice(quiet_unit * geometry.head_dim, (quiet_unit + 1) * geometry.head_dim)
    with torch.no_grad():
        for layer in adapter.decoder_layers(model):
            # tiny value rows (and up rows): tiny o_proj (down_proj) inputs; large output columns
            # make the same units the heaviest by weight, so only an activation criterion drops them
            adapter.projection(layer, "v").weight[unit_rows] *= 1e-3
            adapter.projection(layer, "o").weight[:, unit_rows] *= 100.0
            adapter.projection(layer, "up").weight[quiet_channels] *= 1e-3
            adapter.projection(layer, "down").weight[:, quiet_channels] *= 100.0
    blocks = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    counter = ParamCounter.from_model(model, adapter)
    budget = resolve_budget(counter, ratio=0.3)
    result = one_shot(model, "minitron", counter, budget, blocks, adapter=adapter)
    arch = result.architecture
    assert budget.target - 0.01 * counter.total <= result.params <= budget.target
    assert arch.kept_layers == list(range(geometry.num_layers))  # width pruning only
    assert len({len(units) for units in arch.kept_units}) == 1  # the same shape in every layer
    assert len({len(kept) for kept in arch.kept_channels}) == 1
    for units, kept in zip(arch.kept_units, arch.kept_channels):
        assert len(units) < geometry.units[0] and quiet_unit not in units
        assert len(kept) < geometry.channels[0] and not set(quiet_channels) & set(kept)
    by_weight = one_shot(model, "magnitude", counter, budget, blocks, adapter=adapter).architecture
    assert all(quiet_unit in units for units in by_weight.kept_units)
    assert all(set(quiet_channels) <= set(kept) for kept in by_weight.kept_channels)


@pytest.mark.parametrize("method", ["minitron", "taylor", "shortgpt"])
def test_uniform_layout_peers_keep_a_head_count_the_stock_config_saves(tmp_path, monkeypatch, capsys, method):
    require_shared()
    monkeypatch.chdir(tmp_path)
    # stories260K: 8 heads over a width of 64; the same-ratio rule's 3 of 4 KV groups (6 heads) has no
    # stock LlamaConfig in transformers 5 (64 % 6 != 0): the peers must snap as the DMS search does
    config = AutoConfig.from_pretrained(STORIES)
    allowed = stock_unit_counts(config, get_adapter(config).geometry(AutoModelForCausalLM.from_config(config)))
    assert 3 not in allowed and {2, 4} <= set(allowed)
    argv = ["prune", str(STORIES), "--ratio", "0.3", "--calib", str(TINYSTORIES), "--method", method,
            "--layout", "uniform", "-o", "out", "--quiet", "--no-eval", "data.num_blocks=64"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in saved and saved["num_key_value_heads"] in allowed  # a stock config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no remote code
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"] <= report["params"]["target"]
