import torch

from hf_vitcompress import LowRankLinear
from hf_vitcompress.methods.activation_aware.compensation import train_compensation


def test_compensation_lowers_the_error_it_trains_on():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 32, generator=generator) / 6
    dense_inputs = [torch.randn(256, 32, generator=generator) for _ in range(4)]
    # The compressed model feeds the layer a perturbed input (error from earlier compressed layers).
    drift = torch.eye(32) + 0.2 * torch.randn(32, 32, generator=generator)
    compressed_inputs = [x @ drift for x in dense_inputs]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    layer = LowRankLinear.from_factors(u[:, :8] * s[:8], vh[:8])
    results = train_compensation(
        {"layer": (weight, layer)},
        list(zip(dense_inputs, compressed_inputs)),
        residual_rank=4,
        epochs=60,
        lr=3e-3,
    )
    (result,) = results
    assert result.kept and result.error_after < 0.9 * result.error_before
    x, x_hat = torch.cat(dense_inputs), torch.cat(compressed_inputs)
    measured = (x_hat @ layer.dense_weight().T - x @ weight.T).square().sum() / (x @ weight.T).square().sum()
    torch.testing.assert_close(
        measured.double(), torch.tensor(result.error_after, dtype=torch.float64), rtol=1e-4, atol=1e-6
    )
    assert torch.equal(
        layer.dense_weight(), layer.lowrank_up.weight @ layer.lowrank_down.weight
    )  # folded into one pair


def test_compensation_never_makes_things_worse():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 16, generator=generator)
    inputs = [torch.randn(64, 16, generator=generator)]
    u, s, vh = torch.linalg.svd(weight)
    layer = LowRankLinear.from_factors(u[:, :6] * s[:6], vh[:6])
    original = layer.dense_weight().clone()
    (result,) = train_compensation(
        {"l": (weight, layer)}, list(zip(inputs, inputs)), residual_rank=2, epochs=3, lr=10.0
    )
    if not result.kept:
        assert torch.equal(layer.dense_weight(), original)
    assert result.error_after <= result.error_before
