"""Aligned widths (--channel-multiple M): groups of M channels are the unit the search keeps."""

import json
import os
import subprocess

import pytest
import torch
from conftest import STORIES, TINYSTORIES, require_shared
from transformers import AutoModelForCausalLM

from dms_llm.budget import ParamCounter, resolve_budget
from dms_llm.channel_groups import ChannelGroups
from dms_llm.config import PruneConfig, SearchConfig
from dms_llm.errors import DMSError
from dms_llm.masks import MaskSet
from dms_llm.search_loop import search
from dms_llm.slicing import slice_model

SHORT = SearchConfig(mode="structure", steps=60, batch_size=4, layer_score_every=20, score_blocks=8)


@pytest.mark.parametrize(("multiple", "ratio"), [(8, 0.25), (32, 0.3)])
def test_grouped_search_keeps_multiples_lands_exactly_and_masked_equals_sliced(calib, multiple, ratio):
    require_shared()
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    masks = MaskSet(model, channel_multiple=multiple)
    counter = ParamCounter.from_model(model, masks.adapter)
    budget = resolve_budget(counter, ratio=ratio)
    result = search(model, masks, counter, budget, calib.calib, SHORT, seed=0, progress=False)
    arch = result.architecture
    kept = [len(arch.kept_channels[i]) for i in arch.kept_layers]
    assert kept and all(c % multiple == 0 and c > 0 for c in kept), kept
    assert budget.floor <= result.params <= budget.target
    tokens = calib.heldout[:256].view(2, 128)
    model.double()
    masks.mode = "hard"
    masks.refresh()
    with torch.no_grad():
        masked = model(tokens).logits
    assert masks.param_count(counter).item() == result.params  # the differentiable count is exact
    masks.remove()
    slice_model(model, arch)
    with torch.no_grad():
        sliced = model(tokens).logits
    torch.testing.assert_close(sliced, masked, atol=1e-9, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == result.params


def test_groups_partition_the_strongest_channels_and_leave_the_weakest_out():
    require_shared()
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    masks = MaskSet(model, channel_multiple=32)
    groups: ChannelGroups = masks.channel_groups
    assert groups.counts == [172 // 32] * 5
    layer = model.model.layers[0].mlp
    proxy = layer.down_proj.weight.norm(dim=0) * layer.up_proj.weight.norm(dim=1)
    left_over = (groups.group_of[0] == groups.counts[0]).nonzero().flatten()
    assert len(left_over) == 172 % 32
    assert proxy[left_over].max() <= proxy[groups.members[0].flatten()].min()  # the weakest are left over
    every = groups.channels_of(0, list(range(groups.counts[0])))
    assert len(every) == len(set(every)) == 160 and groups.groups_of(0, every) == list(range(5))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], requires_grad=True)
    expanded = groups.expand(0, mask)
    assert expanded.sum().item() == 64 and expanded[left_over].abs().sum().item() == 0
    expanded.sum().backward()
    assert mask.grad.tolist() == [32.0] * 5  # a group's gradient sums its channels'


def test_bad_multiples_are_clear_errors():
    require_shared()
    with pytest.raises(DMSError, match="--channel-multiple must be a whole number"):
        PruneConfig(channel_multiple=0).validate()
    with pytest.raises(DMSError, match="larger than layer 0's MLP width"):
        MaskSet(AutoModelForCausalLM.from_pretrained(STORIES), channel_multiple=256)


def test_cli_multiple_32_exports_mlp_tensors_that_all_quantize_to_q8_0(tmp_path):
    require_shared()
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "aligned"
    done = subprocess.run(
        ["dms-llm", "prune", str(STORIES), "--ratio", "0.3", "--channel-multiple", "32", "--calib", str(TINYSTORIES),
         "--quiet", "--no-eval", "search.steps=20", "data.num_blocks=32", "-o", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    shapes = json.loads((out / "config.json").read_text()).get("dms_layer_shapes")
    assert shapes and all(s["intermediate_size"] % 32 == 0 for s in shapes)
    assert json.loads((out / "report.json").read_text())["settings"]["channel_multiple"] == 32
    exported = subprocess.run(["dms-llm", "export", str(out), "--outtype", "q8_0", "-o", str(tmp_path / "m.gguf")])
    assert exported.returncode == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    ffn = [t for t in reader.tensors if t.name.split(".")[-2] in ("ffn_gate", "ffn_up", "ffn_down")]
    assert ffn and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in ffn)
