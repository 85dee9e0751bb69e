import pytest
import torch

from hf_vitcompress import BudgetError, CompressionConfig, compress, count_parameters
from hf_vitcompress.budget import RankCandidate, allocate_global, allocate_uniform

from .conftest import tiny_vit


@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.5, 0.35])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_plan_meets_ratio_exactly(pixels, ratio, allocation):
    model = tiny_vit()
    dense = count_parameters(model)
    small = compress(
        model, CompressionConfig(target_param_ratio=ratio, rank_allocation=allocation), pixels, progress=False
    )
    real = count_parameters(small)
    plan = small.compression_plan
    assert plan.parameters == real and plan.dense_parameters == dense
    target = int(ratio * dense)
    smallest_step = min(layer.in_features + layer.out_features for layer in plan.layers.values())
    assert real <= target
    assert target - real < smallest_step  # as close as one rank step allows


def test_unreachable_ratio_names_smallest_reachable(pixels):
    with pytest.raises(BudgetError, match=r"smallest reachable ratio is 0\.\d+"):
        compress(tiny_vit(), CompressionConfig(target_param_ratio=0.01), pixels, progress=False)


def test_ratio_one_changes_nothing(pixels):
    model = tiny_vit()
    small = compress(model, CompressionConfig(target_param_ratio=1.0), pixels, progress=False)
    assert small.compression_plan.layers == {}
    torch.testing.assert_close(small(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def _candidate(name, errors, size=8):
    return RankCandidate(name, size, size, torch.tensor(errors, dtype=torch.float64))


def test_global_allocation_prefers_the_layer_that_loses_least():
    # a: energy in one component; b: spread evenly. Budget for 2 ranks in total (each rank costs 16).
    a = _candidate("a", [1.0, 0.01, 0.005, 0.0, 0.0])
    b = _candidate("b", [1.0, 0.75, 0.5, 0.25, 0.0])
    ranks = allocate_global([a, b], budget=4 * 16)
    assert ranks == {"a": 1, "b": 3}
    assert allocate_uniform([a, b], budget=4 * 16) == {"a": 2, "b": 2}
