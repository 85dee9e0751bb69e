"""Fused low-rank linear: ``y = (x · Vᵀ) · Uᵀ + b`` with the ``n × r`` intermediate kept on chip.

Two separate GEMMs write the ``n × r`` intermediate to memory and read it back; at ViT widths and
small ranks both are memory-bound, so the round trip is a large share of the time on a GPU. Here one
program takes a tile of rows, computes its ``x·Vᵀ`` tile in registers (looping over the input width),
then loops over output tiles multiplying by ``Uᵀ`` and adding the bias in the epilogue.

:func:`lowrank_linear` dispatches: the Triton kernel for CUDA tensors when Triton is installed (or for
CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests check it), else the PyTorch reference
:func:`lowrank_linear_reference`.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is an optional extra (`pip install hf_vitcompress[triton]`)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def lowrank_linear_reference(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The PyTorch path (two GEMMs): the reference for the kernel and the fallback without a GPU."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up, bias)


if triton is not None:

    @triton.jit
    def _fused_lowrank_kernel(
        x_ptr,
        down_ptr,
        up_ptr,
        bias_ptr,
        y_ptr,
        rows,
        in_features,
        out_features,
        rank,
        stride_xm,
        stride_dr,
        stride_un,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        # t = x_tile · downᵀ, accumulated over the input width in fp32, kept in registers
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=(offs_m[:, None] < rows) & (offs_k[None, :] < in_features),
                other=0.0,
            )
            d = tl.load(
                down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None],
                mask=(offs_r[None, :] < rank) & (offs_k[:, None] < in_features),
                other=0.0,
            )
            t += tl.dot(x, d)
        t = t.to(x_ptr.dtype.element_ty)
        for n0 in range(0, out_features, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            u = tl.load(
                up_ptr + offs_n[None, :] * stride_un + offs_r[:, None],
                mask=(offs_n[None, :] < out_features) & (offs_r[:, None] < rank),
                other=0.0,
            )
            y = tl.dot(t, u)
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=offs_n < out_features, other=0.0).to(tl.float32)[None, :]
            tl.store(
                y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                y.to(y_ptr.dtype.element_ty),
                mask=(offs_m[:, None] < rows) & (offs_n[None, :] < out_features),
            )


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device`` (CUDA with Triton, or anything in the interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_lowrank_linear(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_m: int = 32,
    block_k: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """The Triton kernel. ``x [..., in]``, ``down [r, in]``, ``up [out, r]``, ``bias [out]`` → ``[..., out]``."""
    if triton is None:
        raise ImportError("The fused kernel needs Triton: pip install 'hf_vitcompress[triton]'.")
    if not triton_available(x.device):
        raise RuntimeError(
            f"The fused kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, for tests); got a tensor on "
            f"{x.device}. Use lowrank_linear(), which falls back to PyTorch."
        )
    rank, in_features = down.shape
    out_features = up.shape[0]
    if x.shape[-1] != in_features or up.shape[1] != rank or (bias is not None and bias.shape != (out_features,)):
        raise ValueError(
            f"Shapes do not chain: x {tuple(x.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}, "
            f"bias {None if bias is None else tuple(bias.shape)}."
        )
    if not x.dtype == down.dtype == up.dtype:
        raise TypeError(f"x, down and up must share a dtype; got {x.dtype}, {down.dtype}, {up.dtype}.")
    leading = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    down, up = down.contiguous(), up.contiguous()
    y = torch.empty(x2.shape[0], out_features, device=x.device, dtype=x.dtype)
    block_r = max(16, triton.next_power_of_2(rank))
    grid = (triton.cdiv(x2.shape[0], block_m),)
    _fused_lowrank_kernel[grid](
        x2,
        down,
        up,
        bias if bias is not None else y,  # a valid pointer, never read without HAS_BIAS
        y,
        x2.shape[0],
        in_features,
        out_features,
        rank,
        x2.stride(0),
        down.stride(0),
        up.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )
    return y.reshape(*leading, out_features)


def lowrank_linear(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused kernel where it can run, PyTorch otherwise (same result up to rounding)."""
    if triton_available(x.device) and not torch.is_grad_enabled():
        return fused_lowrank_linear(x, down, up, bias)
    return lowrank_linear_reference(x, down, up, bias)
