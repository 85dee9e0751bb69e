import torch

from hf_vitcompress import LayerStatistics, LowRankLinear
from hf_vitcompress.methods.activation_aware.factorization import whitened_svd


def _statistics(x: torch.Tensor) -> LayerStatistics:
    stats = LayerStatistics.empty(x.shape[1])
    for chunk in x.split(37):  # streamed in uneven chunks: sums must not depend on batching
        stats.update(chunk)
    return stats


def test_discarded_energy_equals_measured_output_error():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=generator, dtype=torch.float64)
    x = torch.randn(500, 24, generator=generator, dtype=torch.float64) @ mixing  # correlated inputs
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    svd = whitened_svd(weight, _statistics(x), whitening="gram", damping=0.0)
    assert svd.solver == "cholesky"
    for rank in (1, 4, 9, 15):
        up, down = svd.factors(rank)
        measured = (x @ (weight - up @ down).T).square().sum() / x.shape[0]
        torch.testing.assert_close(measured, svd.spectrum[rank:].sum(), rtol=1e-9, atol=1e-9)
    up, down = svd.factors(16)
    torch.testing.assert_close(up @ down, weight, rtol=1e-8, atol=1e-8)


def test_whitening_beats_plain_svd_on_its_own_objective():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(400, 32, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, 32, dtype=torch.float64)
    weight = torch.randn(32, 32, generator=generator, dtype=torch.float64)
    stats = _statistics(x)
    errors = {}
    for whitening in ("gram", "diagonal", "none"):
        up, down = whitened_svd(weight, stats, whitening=whitening, damping=0.0).factors(8)
        errors[whitening] = float((x @ (weight - up @ down).T).square().sum())
    assert errors["gram"] < errors["diagonal"] < errors["none"]


def test_cholesky_fallback_on_rank_deficient_gram():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(10, 32, generator=generator, dtype=torch.float64)  # 10 tokens, 32 dims: rank 10
    x[:, 5] = 0.0  # a dead channel
    weight = torch.randn(20, 32, generator=generator, dtype=torch.float64)
    svd = whitened_svd(weight, _statistics(x), whitening="gram", damping=0.0)
    assert svd.solver in ("cholesky+shift", "eigh")
    assert torch.isfinite(svd.left).all() and torch.isfinite(svd.right).all()
    up, down = svd.factors(10)  # the data spans 10 directions: rank 10 reproduces every output
    torch.testing.assert_close(x @ (up @ down).T, x @ weight.T, rtol=1e-5, atol=1e-6)


def test_zero_gram_uses_eigendecomposition():
    stats = _statistics(torch.zeros(8, 6, dtype=torch.float64))
    svd = whitened_svd(torch.randn(4, 6, dtype=torch.float64), stats, whitening="gram")
    assert svd.solver == "eigh" and torch.isfinite(svd.right).all()


def test_low_rank_linear_merge_matches_forward():
    layer = LowRankLinear(12, 7, rank=3)
    x = torch.randn(5, 12)
    merged = layer.merge()
    assert isinstance(merged, torch.nn.Linear)
    torch.testing.assert_close(merged(x), layer(x))
    assert dict(layer.named_children()).keys() == {"lowrank_down", "lowrank_up"}
    assert all(isinstance(child, torch.nn.Linear) for child in layer.children())
