import torch

from hf_vitcompress import LowRankLinear
from hf_vitcompress.methods.activation_aware.compensation import train_compensation


def _drifted_layer_problem(seed: int = 0):
    """A rank-8 truncation of ``W`` [24, 32] and calibration / held-out batches ``(x, x̂)`` where the compressed
    model feeds the layer ``x̂ = x·D`` (error from earlier compressed layers): structure the truncation, made
    from ``W`` alone, cannot see and the trained residual has to learn."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 32, generator=generator) / 6
    drift = torch.eye(32) + 0.2 * torch.randn(32, 32, generator=generator)

    def batches(count):
        inputs = [torch.randn(256, 32, generator=generator) for _ in range(count)]
        return [(x, x @ drift) for x in inputs]

    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    layer = LowRankLinear.from_factors(u[:, :8] * s[:8], vh[:8])
    return weight, layer, batches(4), batches(4)


def _relative_output_error(weight, layer, pairs):
    """‖x̂·Ŵᵀ − x·Wᵀ‖² / ‖x·Wᵀ‖², computed here from the layer's weights (not by the code under test)."""
    x, x_hat = torch.cat([p[0] for p in pairs]).double(), torch.cat([p[1] for p in pairs]).double()
    with torch.no_grad():
        target = x @ weight.double().T
        return float((x_hat @ layer.dense_weight().double().T - target).square().sum() / target.square().sum())


def test_compensation_lowers_the_error_it_trains_on():
    weight, layer, calibration, _ = _drifted_layer_problem()
    (result,) = train_compensation({"layer": (weight, layer)}, calibration, residual_rank=4, epochs=60, lr=3e-3)
    assert result.kept and result.error_after < 0.9 * result.error_before
    measured = _relative_output_error(weight, layer, calibration)
    assert abs(measured - result.error_after) <= 1e-4 * result.error_after + 1e-6
    assert torch.equal(
        layer.dense_weight(), layer.lowrank_up.weight @ layer.lowrank_down.weight
    )  # folded into one pair


def test_compensation_halves_the_held_out_error_and_trains_only_the_residual():
    """On images it never saw (same drift), the trained residual cuts the layer's output error by more than half:
    measured 1.260 -> 0.518 (x0.41). A zero learning rate, or gradients that do not reach the residual, leave
    the truncation as it was (x1.0); training toward the wrong target (x̂·Wᵀ) makes it worse."""
    weight, layer, calibration, held_out = _drifted_layer_problem()
    frozen_up, frozen_down = layer.lowrank_up.weight[:, :4].clone(), layer.lowrank_down.weight[:4].clone()
    before = _relative_output_error(weight, layer, held_out)
    (result,) = train_compensation({"layer": (weight, layer)}, calibration, residual_rank=4, epochs=60, lr=3e-3)
    after = _relative_output_error(weight, layer, held_out)
    assert result.kept and after < 0.5 * before
    # the first rank - residual_rank components are frozen; only the last residual_rank ones were trained
    assert torch.equal(layer.lowrank_up.weight[:, :4], frozen_up)
    assert torch.equal(layer.lowrank_down.weight[:4], frozen_down)


def test_a_residual_that_does_not_help_is_rejected_and_the_layer_restored():
    """A diverging run (learning rate 10) ends worse than it began: it is rejected and the truncated layer is
    restored bit for bit, with error_after reported as the error it keeps."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 16, generator=generator)
    inputs = [torch.randn(64, 16, generator=generator)]
    u, s, vh = torch.linalg.svd(weight)
    layer = LowRankLinear.from_factors(u[:, :6] * s[:6], vh[:6])
    original = layer.dense_weight().clone()
    (result,) = train_compensation(
        {"l": (weight, layer)}, list(zip(inputs, inputs)), residual_rank=2, epochs=3, lr=10.0
    )
    assert not result.kept
    assert torch.equal(layer.dense_weight(), original)
    assert result.error_after == result.error_before
    assert abs(_relative_output_error(weight, layer, list(zip(inputs, inputs))) - result.error_before) < 1e-6
