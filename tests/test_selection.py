"""The self-chosen default: true output errors, Fisher output weights, and the choice by held-out output error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_vitcompress import CompressionConfig, LayerStatistics, build_model_card, compress
from hf_vitcompress.calibration.sensitivity import OutputSensitivity, accumulate_sensitivity
from hf_vitcompress.calibration.validation import HeldOutReference
from hf_vitcompress.methods.activation_aware.factorization import output_errors, whitened_svd

from .conftest import tiny_vit


def _statistics(x: torch.Tensor) -> LayerStatistics:
    stats = LayerStatistics.empty(x.shape[1])
    for chunk in x.split(37):
        stats.update(chunk)
    return stats


def _correlated(seed: int, rows: int = 400, width: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    return torch.randn(rows, width, generator=generator, dtype=torch.float64) @ mixing


@pytest.mark.parametrize("whitening", ["none", "diagonal", "gram"])
@pytest.mark.parametrize("weighted", [False, True])
def test_output_errors_are_the_measured_output_error_at_every_rank(whitening, weighted):
    """The allocator's error for a plain or diagonal SVD is its true (weighted) output error, not its spectrum."""
    x = _correlated(0)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = (
        torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1 if weighted else None
    )
    stats = _statistics(x)
    svd = whitened_svd(weight, stats, whitening=whitening, damping=0.0, output_weights=weights)
    errors = output_errors(svd, stats.mean_gram(), weights)
    assert errors.shape == (17,)
    for rank in range(17):
        up, down = svd.factors(rank)
        residual = (x @ (weight - up @ down).T).square()
        measured = (residual * (1 if weights is None else weights)).sum() / x.shape[0]
        torch.testing.assert_close(errors[rank], measured, rtol=1e-8, atol=1e-9)
    if whitening != "gram":  # the spectrum of a non-Gram SVD is not the output error: the reason for output_errors
        spectrum_error = svd.spectrum[8:].sum()
        assert not torch.isclose(spectrum_error, errors[8], rtol=0.05)


def test_output_weights_move_the_error_to_the_channels_that_matter():
    """With Gram whitening and output weights the SVD is optimal for the weighted error (FWSVD combined with
    whitening): lower weighted error than the unweighted factorization at every rank below full."""
    x = _correlated(3)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights = torch.logspace(-3, 1, 16, dtype=torch.float64)
    stats = _statistics(x)
    weighted = output_errors(
        whitened_svd(weight, stats, damping=0.0, output_weights=weights), stats.mean_gram(), weights
    )
    plain = output_errors(whitened_svd(weight, stats, damping=0.0), stats.mean_gram(), weights)
    assert bool((weighted[1:16] < plain[1:16]).all())
    assert float(weighted[6]) < 0.5 * float(plain[6])


class _Scaled(nn.Module):
    """``pixel_values [n, tokens, 4]`` → linear → fixed per-channel scale: the backbone output's Jacobian with
    respect to the linear's output is ``diag(scale)``."""

    def __init__(self, scale: torch.Tensor, as_logits: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(4, scale.numel())
        self.register_buffer("scale", scale)
        self.as_logits = as_logits

    def forward(self, pixel_values):
        out = self.linear(pixel_values) * self.scale
        return SimpleNamespace(logits=out) if self.as_logits else SimpleNamespace(last_hidden_state=out)


def test_backbone_sensitivity_is_the_squared_jacobian_summed_over_tokens():
    scale = torch.tensor([0.1, 1.0, 3.0])
    model, into = _Scaled(scale), OutputSensitivity()
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        accumulate_sensitivity(model, ["linear"], torch.randn(16, 5, 4), into, generator)
    assert into.images == 3200
    # E[(z·s)²] = s² per token, 5 tokens per image
    torch.testing.assert_close(into.weights("linear"), (5 * scale.square()).double(), rtol=0.05, atol=1e-3)
    assert model.linear.weight.grad is None  # only the outputs' gradients are asked for


def test_classifier_sensitivity_is_the_softmax_fisher():
    """With model-sampled labels the expected squared gradient of log p at the logits is p·(1 − p)."""
    model, into = _Scaled(torch.ones(3), as_logits=True), OutputSensitivity()
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        accumulate_sensitivity(model, ["linear"], torch.randn(64, 4), into, generator)
    p = torch.softmax(torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(into.weights("linear"), p * (1 - p), rtol=0.1, atol=0.0)  # ~3 standard errors


def test_a_candidate_must_win_by_more_than_the_noise():
    reference = HeldOutReference()
    base = torch.full((40,), 1.0, dtype=torch.float64)
    noise = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert reference.significantly_lower(base - 0.1, base)  # lower on every image
    assert not reference.significantly_lower(base + 0.1 * noise, base)  # lower or higher by chance
    assert not reference.significantly_lower(base + 0.1, base)  # higher
    assert not reference.significantly_lower(base, base)


def _skewed_model():
    """A tiny ViT whose final LayerNorm passes half the channels on 300x more strongly than the other half, so
    the errors of the last linears matter very unequally across their output channels."""
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layernorm.weight[24:] = 0.01
        model.vit.layernorm.weight[:24] *= 3
    return model


def _kl(dense, small, images) -> float:
    with torch.no_grad():
        reference, logits = dense(pixel_values=images).logits, small(pixel_values=images).logits
    return float(F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"))


def test_the_choice_follows_the_held_out_error():
    """With plain SVD, Fisher weights lower the held-out error far beyond noise: the selection must take them
    (a search that keeps its first candidate, or weights that do nothing, fail here), and the result must be
    better on fresh images too."""
    dense = _skewed_model()
    images = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fresh = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    chosen = compress(dense, CompressionConfig(target_param_ratio=0.5, whitening="none"), images, progress=False)
    selection = chosen.compression_plan.selection
    assert selection["chosen"]["loss_weighting"] == "fisher"
    assert selection["held_out_images"] == 16 and selection["metric"] == "kl_divergence"
    assert len(selection["candidates"]) == 4
    scores = {(c["loss_weighting"], c["rank_allocation"]): c["output_error"] for c in selection["candidates"]}
    choice = (selection["chosen"]["loss_weighting"], selection["chosen"]["rank_allocation"])
    assert scores[choice] == min(scores.values())
    plain = compress(
        dense,
        CompressionConfig(target_param_ratio=0.5, whitening="none", loss_weighting="none", rank_allocation="global"),
        images,
        progress=False,
    )
    assert _kl(dense, chosen, fresh) < 0.5 * _kl(dense, plain, fresh)


def test_each_recorded_score_is_that_candidates_error_on_the_held_out_images():
    """Compressing with one candidate's settings on the images the selection fitted on, and measuring on the
    images it held out (every 8th), reproduces the recorded score: the split, the metric and the install /
    restore of candidates are what they claim."""
    dense = tiny_vit()
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    held = torch.arange(64) % 8 == 7
    auto = compress(dense, CompressionConfig(target_param_ratio=0.5, loss_weighting="none"), images, progress=False)
    candidates = auto.compression_plan.selection["candidates"]
    assert len(candidates) == 6 and auto.compression_plan.selection["held_out_images"] == 8
    for candidate in candidates:
        options = {k: candidate[k] for k in ("whitening", "loss_weighting", "rank_allocation")}
        small = compress(dense, CompressionConfig(target_param_ratio=0.5, **options), images[~held], progress=False)
        assert small.compression_plan.selection is None  # nothing to choose: nothing measured or recorded
        assert _kl(dense, small, images[held]) == pytest.approx(candidate["output_error"], rel=2e-3)
        chosen = auto.compression_plan.selection["chosen"]
        if options == {key: chosen[key] for key in options}:
            assert small.compression_plan.layers == auto.compression_plan.layers


def test_too_few_calibration_images_to_hold_any_out_is_a_clear_error():
    with pytest.raises(ValueError, match="held-out calibration images"):
        compress(tiny_vit(), CompressionConfig(), torch.randn(4, 3, 16, 16), progress=False)
    fixed = CompressionConfig(whitening="gram", loss_weighting="fisher", rank_allocation="global")
    assert compress(tiny_vit(), fixed, torch.randn(4, 3, 16, 16), progress=False).compression_plan.selection is None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(loss_weighting="hessian"), "loss_weighting"),
        (dict(validation_interval=1), "validation_interval"),
        (dict(sensitivity_samples=0), "sensitivity_samples"),
        (dict(method="head_factorization", loss_weighting="fisher"), "loss_weighting='fisher'"),
    ],
)
def test_bad_selection_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**options)


def test_head_factorization_auto_means_what_it_supports():
    config = CompressionConfig(method="head_factorization")
    assert (config.whitening, config.rank_allocation, config.loss_weighting) == ("gram", "global", "none")


def test_the_card_says_how_the_factorization_was_chosen(pixels):
    small = compress(tiny_vit(), CompressionConfig(target_param_ratio=0.6), pixels, progress=False)
    chosen = small.compression_plan.selection["chosen"]
    card = str(build_model_card(small))
    assert "chosen among 12 factorizations as the lowest kl divergence on 6 held-out calibration images" in card
    if chosen["loss_weighting"] == "fisher":
        assert "Fisher sensitivity" in card
