"""Half-precision models (bfloat16, float16) compress with every method, to a model in the same dtype.

The reference is the float32 compression of the *same* weights (the half model cast up), so the only
difference allowed is rounding: the compressed models may differ by about what the dense half model
differs from its float32 cast, far less than what compression itself changes.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_vitcompress import CompressionConfig, compress
from hf_vitcompress.cli import main

from .conftest import tiny_vit

compress_module = importlib.import_module("hf_vitcompress.compress")  # the package attribute is the function

FAST = dict(calibration_samples=8)  # the default config otherwise: the factorization chosen on held-out images
# Taylor scores are cheap: all 48 images, enough for bfloat16 gradients to reorder groups if scored in bfloat16.
METHODS = {
    "default": CompressionConfig(target_param_ratio=0.6, **FAST),
    "compensation": CompressionConfig(target_param_ratio=0.6, compensation_rank=8, compensation_epochs=1, **FAST),
    "sequential": CompressionConfig(
        target_param_ratio=0.6, sequential=True, compensation_rank=8, compensation_epochs=1, **FAST
    ),
    "head_factorization": CompressionConfig(method="head_factorization", target_param_ratio=0.6, **FAST),
    "pruning_magnitude": CompressionConfig(method="pruning", target_flops_ratio=0.6),
    "pruning_taylor": CompressionConfig(
        method="pruning", target_flops_ratio=0.6, pruning_importance="taylor", calibration_samples=48
    ),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check_half_compression(dtype: torch.dtype, config: CompressionConfig, pixels: torch.Tensor) -> None:
    half = tiny_vit().to(dtype)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    as_float = copy.deepcopy(half).float()  # the same weights in float32
    images = pixels[: config.calibration_samples]
    small = compress(half, config, images, progress=False)
    reference = compress(as_float, config, images, progress=False)

    assert {p.dtype for p in small.parameters()} == {dtype}
    assert {b.dtype for b in small.buffers() if b.is_floating_point()} <= {dtype}
    assert next(half.parameters()).dtype == dtype  # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in half.state_dict().items())
    assert small.compression_plan.layers == reference.compression_plan.layers  # same decisions
    with torch.no_grad():
        out = small(pixel_values=images.to(dtype)).logits
        expected = reference(pixel_values=images).logits
        rounding = _relative(half(pixel_values=images.to(dtype)).logits, as_float(pixel_values=images).logits)
        change = _relative(expected, as_float(pixel_values=images).logits)
    assert out.dtype == dtype
    assert _relative(out, expected) <= 2 * rounding + 2e-3, (_relative(out, expected), rounding)
    assert change > 5 * (2 * rounding + 2e-3)  # the bound above is far below what compression changes


@pytest.mark.parametrize("name", [name for name in METHODS if name != "compensation"])
def test_bfloat16_model_compresses_with_every_method(name, pixels):
    _check_half_compression(torch.bfloat16, METHODS[name], pixels)


def test_float16_model_compresses_with_the_default(pixels):
    """On the CPU float16 runs on a float32 copy (float16 matmuls are emulated there); cast back at the end."""
    assert compress_module.compute_dtype(tiny_vit().half()) == torch.float32
    _check_half_compression(torch.float16, METHODS["compensation"], pixels)


@pytest.mark.parametrize("name", ["compensation", "pruning_taylor"])
def test_float16_in_its_own_dtype(name, pixels, monkeypatch):
    """What an accelerator runs: the float16 model's own forward passes, no float32 copy."""
    monkeypatch.setattr(compress_module, "compute_dtype", lambda model: next(model.parameters()).dtype)
    _check_half_compression(torch.float16, METHODS[name], pixels)


def test_cli_compresses_a_bfloat16_checkpoint(tmp_path, pixels):
    checkpoint, data = tmp_path / "dense", tmp_path / "calibration.pt"
    tiny_vit().to(torch.bfloat16).save_pretrained(checkpoint)
    torch.save({"pixel_values": pixels[:8]}, data)
    common = ["compress", "--quiet", "--calibration", str(data), "--calibration-samples", "8"]
    common += ["--compensation-epochs", "1", "--target-param-ratio", "0.6"]
    assert main([*common, "--model", str(checkpoint), "--output", str(tmp_path / "out")]) == 0
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(again(pixel_values=pixels[:4].to(torch.bfloat16)).logits).all()
    # --dtype: a float32 checkpoint compressed (and saved) in float16
    tiny_vit().save_pretrained(tmp_path / "dense32")
    assert (
        main([*common, "--model", str(tmp_path / "dense32"), "--dtype", "float16", "--output", str(tmp_path / "o")])
        == 0
    )
    assert {p.dtype for p in AutoModelForImageClassification.from_pretrained(tmp_path / "o").parameters()} == {
        torch.float16
    }
