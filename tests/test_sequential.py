"""Sequential calibration: each factor pair fitted to the dense layer's output on the compressed inputs."""

from __future__ import annotations

import pytest
import torch

from hf_vitcompress import CompressionConfig, compress
from hf_vitcompress.calibration.gram import LayerStatistics, PairedStatistics
from hf_vitcompress.calibration.validation import HeldOutReference
from hf_vitcompress.cli import build_parser
from hf_vitcompress.hub import describe_method
from hf_vitcompress.methods.activation_aware.factorization import output_matched_svd, whitened_svd

from .conftest import tiny_vit


def _pair(seed: int, rows: int = 600, width: int = 20, noise: float = 0.3):
    """Dense inputs ``x`` (correlated, off-centre) and what a compressed model feeds instead: ``x'``, a
    distorted, shifted copy (the error of the compressed layers before)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    x = torch.randn(rows, width, generator=generator, dtype=torch.float64) @ mixing + 0.5
    distortion = torch.eye(width, dtype=torch.float64) + 0.2 * torch.randn(
        width, width, generator=generator, dtype=torch.float64
    )
    x_compressed = x @ distortion + noise * torch.randn(rows, width, generator=generator, dtype=torch.float64) - 0.3
    weight = torch.randn(12, width, generator=generator, dtype=torch.float64)
    bias = torch.randn(12, generator=generator, dtype=torch.float64)
    return x, x_compressed, weight, bias


def _paired(x, x_compressed) -> PairedStatistics:
    paired = PairedStatistics.empty(x.shape[1])
    for dense, compressed in zip(x.split(71), x_compressed.split(71), strict=True):
        paired.update(dense, compressed)
    return paired


def _error(x, x_compressed, weight, bias, up, down, new_bias) -> float:
    target = x @ weight.T + bias
    return float((x_compressed @ (up @ down).T + new_bias - target).square().sum(1).mean())


def test_output_matched_pair_is_the_optimal_reduced_rank_fit():
    """At every rank the mean error to the dense output is the least-squares residual (no rank does better)
    plus exactly the discarded spectrum: the SVD of M* under the compressed inputs' covariance is optimal."""
    x, x_compressed, weight, bias = _pair(0)
    svd = output_matched_svd(weight, _paired(x, x_compressed), damping=0.0, ridge=0.0)
    augmented = torch.cat([x_compressed, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(augmented, x @ weight.T + bias).solution
    floor = float((augmented @ solution - (x @ weight.T + bias)).square().sum(1).mean())
    for rank in (0, 3, 7, 12):
        up, down = svd.factors(rank)
        measured = _error(x, x_compressed, weight, bias, up, down, bias + svd.bias_shift(rank))
        assert measured == pytest.approx(floor + float(svd.spectrum[rank:].sum()), rel=1e-7, abs=1e-9)


def test_a_layer_without_bias_is_fitted_through_the_origin():
    """No bias to correct: the optimum is over ``A B`` alone (uncentered), and no bias shift is set."""
    x, x_compressed, weight, _ = _pair(3)
    svd = output_matched_svd(weight, _paired(x, x_compressed), damping=0.0, ridge=0.0, free_bias=False)
    assert svd.bias_shift(4) is None
    solution = torch.linalg.lstsq(x_compressed, x @ weight.T).solution
    floor = float((x_compressed @ solution - x @ weight.T).square().sum(1).mean())
    for rank in (3, 8):
        up, down = svd.factors(rank)
        measured = _error(x, x_compressed, weight, 0.0, up, down, 0.0)
        assert measured == pytest.approx(floor + float(svd.spectrum[rank:].sum()), rel=1e-7, abs=1e-9)


def test_output_matched_pair_beats_factorizing_the_weight_on_the_compressed_inputs():
    """The previous sequential objective approximated ``W`` on ``x'``, carrying the upstream error along;
    fitting the dense output corrects it."""
    x, x_compressed, weight, bias = _pair(1)
    matched = output_matched_svd(weight, _paired(x, x_compressed), damping=0.0, ridge=0.0)
    own = LayerStatistics.empty(x.shape[1])
    own.update(x_compressed)
    approximated = whitened_svd(weight, own, damping=0.0)
    for rank in (4, 8):
        up, down = matched.factors(rank)
        fitted = _error(x, x_compressed, weight, bias, up, down, bias + matched.bias_shift(rank))
        up, down = approximated.factors(rank)
        carried = _error(x, x_compressed, weight, bias, up, down, bias)
        assert fitted < 0.8 * carried


def test_identical_inputs_give_the_centered_whitened_svd():
    """Where nothing upstream is compressed, M* is W and only the centering (the free bias) differs from
    the one-shot factorization; at full rank the layer is reproduced exactly."""
    x, _, weight, bias = _pair(2)
    svd = output_matched_svd(weight, _paired(x, x), damping=0.0, ridge=0.5)
    up, down = svd.factors(weight.shape[0])
    torch.testing.assert_close(up @ down, weight, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(svd.bias_shift(weight.shape[0]), torch.zeros(12, dtype=torch.float64), atol=1e-8, rtol=0)


def test_the_ridge_keeps_a_fit_on_few_tokens_from_following_noise():
    """With hardly more tokens than inputs the unregularized map fits the noise of those tokens; the default
    ridge keeps it nearer W and is better on fresh tokens of the same distribution."""
    width, generator = 20, torch.Generator().manual_seed(5)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    distortion = torch.eye(width, dtype=torch.float64) + 0.1 * torch.randn(
        width, width, generator=generator, dtype=torch.float64
    )
    weight = torch.randn(12, width, generator=generator, dtype=torch.float64)

    def draw(rows):
        x = torch.randn(rows, width, generator=generator, dtype=torch.float64) @ mixing
        return x, x @ distortion + 2.0 * torch.randn(rows, width, generator=generator, dtype=torch.float64)

    x, x_compressed = draw(25)
    fresh, fresh_compressed = draw(5000)
    errors = {}
    for ridge in (0.0, None):
        svd = output_matched_svd(weight, _paired(x, x_compressed), ridge=ridge)
        up, down = svd.factors(8)
        errors[ridge] = _error(fresh, fresh_compressed, weight, 0.0, up, down, svd.bias_shift(8))
    assert errors[None] < 0.5 * errors[0.0]


def test_paired_statistics_refuse_mismatched_inputs():
    paired = PairedStatistics.empty(4)
    with pytest.raises(ValueError, match="differ in shape"):
        paired.update(torch.zeros(3, 4), torch.zeros(2, 4))


# one factor pair per linear (the shared q/k/v form's sequential fit is tested in test_shared_qkv.py)
FIXED = dict(
    target_param_ratio=0.5, whitening="gram", loss_weighting="none", rank_allocation="global", shared_qkv=False
)


def _inputs_and_targets(dense, small, name: str, pixels: torch.Tensor):
    """The input ``name`` sees in ``small`` and the dense layer's output on the dense model's input, per token."""
    seen = {}
    hooks = [
        dense.get_submodule(name).register_forward_hook(lambda _m, _a, out: seen.__setitem__("target", out)),
        small.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.__setitem__("input", args[0])),
    ]
    with torch.no_grad():
        dense(pixel_values=pixels)
        small(pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    return seen["input"].reshape(-1, seen["input"].shape[-1]), seen["target"].reshape(-1, seen["target"].shape[-1])


@pytest.mark.parametrize("name", ["vit.layers.1.attention.o_proj", "vit.layers.1.mlp.fc2"])
def test_sequential_layers_fit_the_dense_output_on_their_own_inputs(pixels, name):
    """Inside a compressed model, a sequentially fitted layer reproduces the dense layer's output from the
    inputs it actually gets better than the one-shot layer would from the same inputs."""
    dense = tiny_vit()
    sequential = compress(dense, CompressionConfig(**FIXED, sequential=True), pixels, progress=False)
    one_shot = compress(dense, CompressionConfig(**FIXED), pixels, progress=False)
    assert sequential.compression_plan.layers == one_shot.compression_plan.layers  # the same allocation
    assert one_shot.compression_report.selection_seconds == 0  # nothing was chosen, nothing is reported
    inputs, target = _inputs_and_targets(dense, sequential, name, pixels)
    with torch.no_grad():
        fitted = (sequential.get_submodule(name)(inputs) - target).square().sum()
        carried = (one_shot.get_submodule(name)(inputs) - target).square().sum()
    assert fitted < 0.9 * carried
    assert "fitted to the dense layer's output" in describe_method(sequential.config.compression_config)[1]


def _fit_images(pixels: torch.Tensor, interval: int = 8) -> torch.Tensor:
    return pixels[torch.arange(len(pixels)) % interval != interval - 1]


@pytest.mark.parametrize("kept", [False, True])
def test_sequential_auto_keeps_the_fit_only_when_the_held_out_error_drops(pixels, monkeypatch, kept):
    """'auto' installs the block-by-block fit, and leaves it only if the held-out error is significantly
    lower: otherwise the model is exactly the one-shot factorization of the same (non-held-out) images."""
    monkeypatch.setattr(HeldOutReference, "significantly_lower", lambda *_args, **_kwargs: kept)
    dense = tiny_vit()
    auto = compress(dense, CompressionConfig(**FIXED, sequential="auto"), pixels, progress=False)
    expected = compress(dense, CompressionConfig(**FIXED, sequential=kept), _fit_images(pixels), progress=False)
    selection = auto.compression_plan.selection
    assert selection["chosen"]["sequential"] is kept
    assert [c["sequential"] for c in selection["candidates"]] == [False, True]
    assert all(c["output_error"] > 0 for c in selection["candidates"])
    assert auto.compression_report.sequential_seconds > 0
    assert auto.compression_report.selection_seconds > 0
    for name in auto.compression_plan.layers:
        torch.testing.assert_close(
            auto.get_submodule(name).dense_weight(), expected.get_submodule(name).dense_weight(), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            auto.get_submodule(name).bias, expected.get_submodule(name).bias, rtol=1e-5, atol=1e-6
        )


def test_sequential_auto_records_a_consistent_choice(pixels):
    auto = compress(tiny_vit(), CompressionConfig(**FIXED, sequential="auto"), pixels, progress=False)
    one_shot, fitted = auto.compression_plan.selection["candidates"]
    chosen = auto.compression_plan.selection["chosen"]["sequential"]
    assert chosen is False or fitted["output_error"] < one_shot["output_error"]


def test_sequential_setting_is_checked():
    with pytest.raises(ValueError, match="sequential must be True, False or 'auto'"):
        CompressionConfig(sequential="yes")
    assert CompressionConfig(method="head_factorization", sequential="auto").sequential is False
    with pytest.raises(ValueError, match="sequential=True"):
        CompressionConfig(method="head_factorization", sequential=True)
    parser = build_parser()
    base = ["compress", "--output", "out"]
    assert parser.parse_args([*base, "--sequential", "auto"]).sequential == "auto"
    assert parser.parse_args([*base, "--sequential"]).sequential is True
    assert parser.parse_args([*base, "--no-sequential"]).sequential is False


def test_an_explicit_sequential_fit_is_recorded_with_the_chosen_factorization(pixels):
    """With the factorization chosen by measurement and sequential=True, the record and the card say that the
    installed pairs are the block-by-block fit (the record's ``chosen`` must not contradict the config)."""
    small = compress(tiny_vit(), CompressionConfig(target_param_ratio=0.5, sequential=True), pixels, progress=False)
    selection = small.compression_plan.selection
    assert selection is not None and selection["chosen"]["sequential"] is True
    text = describe_method(small.config.compression_config, selection)[1]
    assert "fitted to the dense layer's output" in text and "kept because" not in text
