"""The fused low-rank Triton kernel against the PyTorch reference (Triton interpreter on CPU)."""

import os

import pytest
import torch

from hf_vitcompress.kernels.lowrank import fused_lowrank_linear, lowrank_linear, lowrank_linear_reference

pytest.importorskip("triton")  # in the dev extra, so CI has it
assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest before anything imports triton


@pytest.mark.parametrize(
    "rows, in_features, out_features, rank, bias",
    [(17, 48, 40, 5, True), (64, 96, 96, 33, False), (3, 20, 70, 1, True), (50, 128, 64, 24, True)],
)
def test_fused_kernel_matches_the_reference_fp32(rows, in_features, out_features, rank, bias):
    generator = torch.Generator().manual_seed(rows + rank)
    x = torch.randn(2, rows, in_features, generator=generator)
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) / rank**0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    expected = lowrank_linear_reference(x.double(), down.double(), up.double(), None if b is None else b.double())
    result = fused_lowrank_linear(x, down, up, b)
    assert result.shape == (2, rows, out_features)
    error = (result.double() - expected).norm() / expected.norm()
    assert error <= 1e-5


def test_dispatch_and_bad_input():
    x, down, up = torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3)
    with torch.no_grad():  # the interpreter is on in tests, so this runs the kernel
        torch.testing.assert_close(lowrank_linear(x, down, up), lowrank_linear_reference(x, down, up))
    with pytest.raises(ValueError, match="do not chain"):
        fused_lowrank_linear(x, down, torch.randn(5, 4))
    with pytest.raises(TypeError, match="share a dtype"):
        fused_lowrank_linear(x, down.double(), up)
