"""Budget resolution, the log penalty and the deterministic landing on the target."""

import math

import pytest
import torch
from conftest import make_tiny

from dms_llm.adapters import get_adapter
from dms_llm.budget import BUDGET_TOLERANCE, Budget, ParamCounter, budget_penalty, parse_param_count, resolve_budget
from dms_llm.errors import DMSError
from dms_llm.masks import MaskSet
from dms_llm.refit import count_params, fit_counts


def counter_of(model):
    return ParamCounter.from_model(model, get_adapter(model.config))


@pytest.mark.parametrize(
    "text,value",
    [
        ("5.4B", 5_400_000_000),
        ("250M", 250_000_000),
        ("180K", 180_000),
        ("180000", 180_000),
        ("1.5e3", 1500),
        (2000, 2000),
    ],
)
def test_parse_param_count(text, value):
    assert parse_param_count(text) == value


def test_parse_param_count_rejects_garbage():
    with pytest.raises(DMSError, match="cannot read parameter count"):
        parse_param_count("lots")


def test_counter_splits_embeddings_for_tied_and_untied_models(stories):
    model, _ = stories
    counter = counter_of(model)
    assert counter.total == 260_032
    assert counter.embedding == 512 * 64  # tied: the embedding counts once
    untied = make_tiny("llama_gqa")
    counter = counter_of(untied)
    assert counter.embedding == 2 * 128 * 64
    assert counter.total == sum(p.numel() for p in untied.parameters())


def test_ratio_resolves_to_a_target_under_the_full_size():
    counter = counter_of(make_tiny("llama_gqa"))
    budget = resolve_budget(counter, ratio=0.25)
    assert budget.target == math.floor(0.75 * counter.total)
    assert budget.floor == budget.target - math.floor(BUDGET_TOLERANCE * counter.total)
    assert resolve_budget(counter, params=budget.target).target == budget.target


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_ratio_outside_the_open_unit_interval_is_rejected(ratio):
    counter = counter_of(make_tiny("llama_gqa"))
    with pytest.raises(DMSError, match="between 0 and 1"):
        resolve_budget(counter, ratio=ratio)


def test_unreachable_ratio_names_the_largest_reachable_one():
    counter = counter_of(make_tiny("llama_gqa"))
    with pytest.raises(DMSError, match=r"largest reachable ratio with targets heads,channels is 0\.\d+") as error:
        resolve_budget(counter, ratio=0.95, targets=["heads", "channels"])
    largest = float(str(error.value).split("is ")[-1].split(" ")[0])
    minimum = counter.minimum(False, True, True)
    assert largest == pytest.approx(1 - minimum / counter.total, abs=1e-3)
    resolve_budget(counter, ratio=largest - 0.01, targets=["heads", "channels"])  # just reachable


def test_ratio_and_params_are_exclusive():
    counter = counter_of(make_tiny("llama_gqa"))
    with pytest.raises(DMSError, match="exactly one"):
        resolve_budget(counter, ratio=0.2, params="1K")


def test_penalty_is_zero_under_the_target_and_log_above():
    params = torch.tensor(1200.0, dtype=torch.float64, requires_grad=True)
    assert budget_penalty(params, 1500.0, 10.0).item() == 0.0
    penalty = budget_penalty(params, 1000.0, 10.0)
    assert penalty.item() == pytest.approx(10 * math.log(1.2))
    penalty.backward()
    assert params.grad.item() == pytest.approx(10 / 1200.0)


def test_target_decays_exponentially_then_holds():
    budget = Budget(total=1000, target=500, minimum=10)
    assert budget.target_at(0, 10) == 1000
    assert budget.target_at(5, 10) == pytest.approx(1000 * 0.5**0.5)
    assert budget.target_at(10, 10) == budget.target_at(99, 10) == 500


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_fit_lands_at_or_under_the_target_within_tolerance(stories, uniform, ratio):
    model, _ = stories
    masks = MaskSet(model, targets=["heads", "channels"], uniform=uniform)
    counter = counter_of(model)
    budget = resolve_budget(counter, ratio=ratio)
    with torch.no_grad():
        for groups in masks.importance.values():
            for group in groups:
                group.copy_(torch.rand(group.shape))
        masks.keep_ratios["heads"].fill_(0.9)
        masks.keep_ratios["channels"].fill_(0.95)  # far over the target: the fit must cut
    arch = masks.architecture()
    counts = fit_counts(
        counter, budget, arch.kept_layers, masks.counts(arch), masks.wants(), ["channels", "heads"], uniform=uniform
    )
    params = count_params(counter, arch.kept_layers, counts)
    assert budget.floor <= params <= budget.target
    landed = masks.architecture_for(arch.kept_layers, counts)
    assert counter.count(landed) == params
    if uniform:
        assert landed.is_uniform


def test_fit_prefers_layers_whose_ratio_wants_fewer_channels(stories):
    model, _ = stories
    masks = MaskSet(model, targets=["channels"])
    counter = counter_of(model)
    with torch.no_grad():
        for group in masks.importance["channels"]:
            group.copy_(torch.rand(group.shape))
        masks.keep_ratios["channels"].copy_(torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0]))
    counts = {"channels": [172] * 5, "heads": [4] * 5}
    budget = Budget(counter.total, counter.total - 80 * counter.layers[2].channel_cost, 1)
    fitted = fit_counts(counter, budget, list(range(5)), counts, masks.wants(), ["channels"])
    assert fitted["channels"] == [172, 172, 92, 172, 172]  # all cuts go where the ratio asked for them


def test_fit_reports_impossible_targets():
    counter = counter_of(make_tiny("llama_gqa"))
    masks = MaskSet(make_tiny("llama_gqa"), targets=["channels"])
    budget = Budget(counter.total, counter.outside_layers + 10, 1)
    counts = {"channels": [96] * 4, "heads": [2] * 4}
    assert fit_counts(counter, budget, [0, 1, 2, 3], counts, masks.wants(), ["channels"]) is None
