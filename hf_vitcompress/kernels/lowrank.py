"""Fused low-rank linear: ``y = act((x · Vᵀ) · Uᵀ + b)`` with the ``n × r`` intermediate kept on chip.

Two separate GEMMs write the ``n × r`` intermediate to memory and read it back; at ViT widths and
small ranks both are memory-bound, so the round trip is a large share of the time on a GPU. Here one
program takes a tile of rows, computes its ``x·Vᵀ`` tile in registers (looping over the input width),
then loops over output tiles multiplying by ``Uᵀ``, adding the bias and applying an optional
activation in the epilogue (in fp32, before the one rounding to the output dtype).

The grouped variant serves the q/k/v projections of an attention block, which all read the same
``x``: one pass over ``x`` feeds G intermediates (one per factor pair), so ``x`` is read from memory
once instead of G times, and each group then writes its own output.

:func:`lowrank_linear` and :func:`grouped_lowrank_linear` dispatch: the Triton kernels for CUDA
tensors when Triton is installed (or for CPU tensors under ``TRITON_INTERPRET=1``, which is how the
tests check them) and autograd is off, else the PyTorch references :func:`lowrank_linear_reference`
and :func:`grouped_lowrank_linear_reference` (the kernels have no backward).

Precision: inputs may be float16, bfloat16 or float32 (the output has the input dtype); every dot
accumulates in fp32. The intermediate is rounded to the input dtype before the second dot, like the
two-GEMM reference, so the second dot runs on the tensor cores in the input dtype. fp32 dots use
``input_precision="ieee"`` so the result is not silently TF32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:  # Triton is an optional extra (`pip install hf_vitcompress[triton]`)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

EPILOGUE_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "relu")
"""Activation names the kernel epilogue applies (besides ``None``). ``"gelu"`` is the exact erf GELU
(``torch.nn.functional.gelu`` and Hugging Face's ``"gelu"``); ``"gelu_tanh"`` and its Hugging Face
aliases ``"gelu_new"`` / ``"gelu_pytorch_tanh"`` are the tanh approximation."""

# Canonical kernel spelling of each accepted name (a constexpr string picks the epilogue at compile time).
_CANONICAL_ACTIVATION = {
    None: "none",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}

KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the fused kernels accept (the PyTorch references take any floating dtype)."""

GROUP_COUNTS: tuple[int, ...] = (2, 3)
"""Numbers of factor pairs the grouped kernel takes (k/v or q/k/v sharing one input)."""

# Used when interpreting (no GPU to tune on) and for block sizes a caller does not override on CUDA.
# Big blocks: the interpreter's cost is per program and per loop iteration, not per element.
_DEFAULT_BLOCK = 64


def _canonical_activation(activation: str | None) -> str:
    """The kernel's name for ``activation``; a ValueError naming the supported ones for anything else."""
    if activation not in _CANONICAL_ACTIVATION:
        raise ValueError(
            f"Unsupported activation {activation!r} for the low-rank epilogue; use None or one of "
            f"{', '.join(repr(a) for a in EPILOGUE_ACTIVATIONS)} (or apply it after the layer)."
        )
    return _CANONICAL_ACTIVATION[activation]


def _reference_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    kind = _canonical_activation(activation)
    if kind == "gelu":
        return torch.nn.functional.gelu(y)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if kind == "relu":
        return torch.relu(y)
    return y


def _reference_bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # The kernel reads an fp32 bias for a half-precision input (mixed-precision master copies); F.linear
    # wants one dtype, so the reference casts it.
    return None if bias is None else bias.to(dtype)


def lowrank_linear_reference(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The PyTorch path (two GEMMs): the reference for the kernel and the fallback without a GPU."""
    _canonical_activation(activation)
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up, _reference_bias(bias, x.dtype))
    return _reference_activation(y, activation)


def grouped_lowrank_linear_reference(
    x: torch.Tensor,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The PyTorch path of the grouped kernel: one two-GEMM low-rank linear per factor pair on the same ``x``."""
    biases = _group_biases(downs, biases)
    return tuple(lowrank_linear_reference(x, d, u, b) for d, u, b in zip(downs, ups, biases, strict=True))


if triton is not None:

    @triton.jit
    def _dot(a, b, INTERPRETER: tl.constexpr, IEEE: tl.constexpr):
        """``a · b`` accumulated in fp32.

        INTERPRETER is set under TRITON_INTERPRET=1 only: the interpreter computes bf16 dots on the raw
        bit patterns (wrong results), so the operands are widened first there; a GPU keeps the native
        half-precision dot. IEEE is set for fp32 inputs so the dot is not TF32.
        """
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # A constexpr condition: Triton compiles only the branch taken.
        return tl.dot(a, b, input_precision="ieee") if IEEE else tl.dot(a, b)

    @triton.jit
    def _to_dtype(v, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
        """Cast the fp32 tile ``v`` to ``dtype``, rounding to nearest even as a GPU does.

        The interpreter truncates fp32 → bf16 (Triton 3.7.1), which doubles the error the tests see; there
        the bits are rounded first (add half an ulp, ties to even) so the truncation is exact. Compiled
        code never takes this branch.
        """
        if INTERPRETER and dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            v = bits.to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _activate(y, ACTIVATION: tl.constexpr):
        """The epilogue activation on the fp32 tile (picked at compile time)."""
        if ACTIVATION == "gelu":
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            # tanh(z) = 1 - 2 / (1 + e^{2z}): tl has no tanh outside libdevice, and this form saturates
            # cleanly to ±1 (e^{2z} → inf or 0) instead of producing inf/inf.
            y = 0.5 * y * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * inner)))
        elif ACTIVATION == "relu":
            y = tl.maximum(y, 0.0)
        return y

    @triton.jit
    def _load_x_tile(x_ptr, offs_m, offs_k, rows, in_features, stride_xm):
        return tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < rows) & (offs_k[None, :] < in_features),
            other=0.0,
        )

    @triton.jit
    def _load_down_tile(down_ptr, offs_r, offs_k, rank, in_features, stride_dr):
        """``downᵀ[k-tile, :]`` as a ``[BLOCK_K, BLOCK_R]`` tile, zero past the rank (padding to BLOCK_R)."""
        return tl.load(
            down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None],
            mask=(offs_r[None, :] < rank) & (offs_k[:, None] < in_features),
            other=0.0,
        )

    @triton.jit
    def _up_epilogue(
        t,
        up_ptr,
        bias_ptr,
        y_ptr,
        offs_m,
        offs_r,
        rows,
        out_features,
        rank,
        stride_un,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        INTERPRETER: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Loop over output tiles: ``act(t · upᵀ + bias)`` in fp32, one rounding to the output dtype."""
        # Round the intermediate like the two-GEMM reference does, which also lets the second dot run in
        # the input dtype on the tensor cores.
        t = _to_dtype(t, y_ptr.dtype.element_ty, INTERPRETER)
        for n0 in range(0, out_features, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            u = tl.load(
                up_ptr + offs_n[None, :] * stride_un + offs_r[:, None],
                mask=(offs_n[None, :] < out_features) & (offs_r[:, None] < rank),
                other=0.0,
            )
            y = _dot(t, u, INTERPRETER, IEEE)
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=offs_n < out_features, other=0.0).to(tl.float32)[None, :]
            y = _activate(y, ACTIVATION)
            tl.store(
                y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                _to_dtype(y, y_ptr.dtype.element_ty, INTERPRETER),
                mask=(offs_m[:, None] < rows) & (offs_n[None, :] < out_features),
            )

    @triton.jit
    def _fused_lowrank_kernel(
        x_ptr,
        down_ptr,
        up_ptr,
        bias_ptr,
        y_ptr,
        rows,
        rows_bucket,  # unused in the body: an autotune key (a power of two ≥ 16, so no extra specialization)
        in_features,
        out_features,
        rank,
        stride_xm,
        stride_dr,
        stride_un,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,
        INTERPRETER: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64: row × stride exceeds 2³¹ for large batches of wide layers (e.g. ViT-B fc1 past ~3,500 images)
        offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        # t = x_tile · downᵀ, accumulated over the input width in fp32, kept in registers
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _load_x_tile(x_ptr, offs_m, offs_k, rows, in_features, stride_xm)
            d = _load_down_tile(down_ptr, offs_r, offs_k, rank, in_features, stride_dr)
            t += _dot(x, d, INTERPRETER, IEEE)
        _up_epilogue(
            t,
            up_ptr,
            bias_ptr,
            y_ptr,
            offs_m,
            offs_r,
            rows,
            out_features,
            rank,
            stride_un,
            stride_ym,
            HAS_BIAS,
            ACTIVATION,
            INTERPRETER,
            IEEE,
            BLOCK_N,
        )

    @triton.jit
    def _fused_grouped_lowrank_kernel(
        x_ptr,
        down0_ptr,
        down1_ptr,
        down2_ptr,
        up0_ptr,
        up1_ptr,
        up2_ptr,
        bias0_ptr,
        bias1_ptr,
        bias2_ptr,
        y0_ptr,
        y1_ptr,
        y2_ptr,
        rows,
        rows_bucket,  # unused in the body: an autotune key
        in_features,
        out0,
        out1,
        out2,
        rank0,
        rank1,
        rank2,
        stride_xm,
        stride_d0,
        stride_d1,
        stride_d2,
        stride_u0,
        stride_u1,
        stride_u2,
        stride_y0,
        stride_y1,
        stride_y2,
        GROUPS: tl.constexpr,
        HAS_BIAS0: tl.constexpr,
        HAS_BIAS1: tl.constexpr,
        HAS_BIAS2: tl.constexpr,
        INTERPRETER: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Triton has no lists of pointers, so the groups are spelled out; with GROUPS == 2 the third
        # group's code is removed at compile time (its pointer arguments are placeholders, never read).
        pid = tl.program_id(0)
        # int64: row × stride exceeds 2³¹ for large batches of wide layers (e.g. ViT-B fc1 past ~3,500 images)
        offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        t0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        t1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        t2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _load_x_tile(x_ptr, offs_m, offs_k, rows, in_features, stride_xm)  # shared by every group
            t0 += _dot(x, _load_down_tile(down0_ptr, offs_r, offs_k, rank0, in_features, stride_d0), INTERPRETER, IEEE)
            t1 += _dot(x, _load_down_tile(down1_ptr, offs_r, offs_k, rank1, in_features, stride_d1), INTERPRETER, IEEE)
            if GROUPS == 3:
                d2 = _load_down_tile(down2_ptr, offs_r, offs_k, rank2, in_features, stride_d2)
                t2 += _dot(x, d2, INTERPRETER, IEEE)
        _up_epilogue(
            t0,
            up0_ptr,
            bias0_ptr,
            y0_ptr,
            offs_m,
            offs_r,
            rows,
            out0,
            rank0,
            stride_u0,
            stride_y0,
            HAS_BIAS0,
            "none",
            INTERPRETER,
            IEEE,
            BLOCK_N,
        )
        _up_epilogue(
            t1,
            up1_ptr,
            bias1_ptr,
            y1_ptr,
            offs_m,
            offs_r,
            rows,
            out1,
            rank1,
            stride_u1,
            stride_y1,
            HAS_BIAS1,
            "none",
            INTERPRETER,
            IEEE,
            BLOCK_N,
        )
        if GROUPS == 3:
            _up_epilogue(
                t2,
                up2_ptr,
                bias2_ptr,
                y2_ptr,
                offs_m,
                offs_r,
                rows,
                out2,
                rank2,
                stride_u2,
                stride_y2,
                HAS_BIAS2,
                "none",
                INTERPRETER,
                IEEE,
                BLOCK_N,
            )


# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages) tried on CUDA. A handful that cover small and large
# row counts; _prune_configs drops those whose fp32 intermediates would not fit in registers.
_AUTOTUNE_SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (32, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 128, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 32, 128, 8, 4),
    (64, 32, 64, 4, 2),
    (32, 32, 64, 4, 2),
)
# fp32 registers per thread the row tile's intermediates may take (of 255), leaving room for the tiles
# being multiplied and the addresses.
_INTERMEDIATE_REGISTER_BUDGET = 128
# Shared memory a config's pipelined tiles may take: below the A100's 164 KB (the H100 has 227 KB).
_SHARED_MEMORY_BUDGET = 160 * 1024
MAX_FUSED_RANK = 256
"""Largest rank the fused kernels take (padded rank tiles above it do not fit on chip); larger ranks use
PyTorch. At such ranks the factor pair is near its break-even width anyway."""


def _autotune_configs() -> list:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, k, n, w, s in _AUTOTUNE_SHAPES
    ]


def _intermediate_registers(config, block_r: int, groups: int) -> float:
    return config.kwargs["BLOCK_M"] * block_r * groups / (32 * config.num_warps)


def _shared_memory(config, block_r: int, groups: int, element_size: int) -> int:
    """Bytes of the pipelined x / down tiles (``num_stages`` copies) plus one up tile."""
    m, k, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"], config.kwargs["BLOCK_N"]
    return (config.num_stages * (m * k + k * block_r * groups) + block_r * n) * element_size


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop configs whose intermediates spill, whose tiles overflow shared memory, or whose row tile
    dwarfs the rows."""
    block_r, groups = kwargs["BLOCK_R"], kwargs.get("GROUPS", 1)
    element_size = named_args["x_ptr"].element_size()
    row_tile_limit = max(32, triton.next_power_of_2(named_args["rows"]))
    kept = [
        c
        for c in configs
        if _intermediate_registers(c, block_r, groups) <= _INTERMEDIATE_REGISTER_BUDGET
        and _shared_memory(c, block_r, groups, element_size) <= _SHARED_MEMORY_BUDGET
        and c.kwargs["BLOCK_M"] <= row_tile_limit
    ]
    # At least one must stay: the smallest on-chip footprint has the best chance to launch.
    return kept or [
        min(
            configs,
            key=lambda c: (
                _shared_memory(c, block_r, groups, element_size),
                _intermediate_registers(c, block_r, groups),
            ),
        )
    ]


_AUTOTUNE_KEYS = {
    "single": ["rows_bucket", "in_features", "out_features", "BLOCK_R"],
    "grouped": ["rows_bucket", "in_features", "out0", "out1", "out2", "BLOCK_R", "GROUPS"],
}
_autotuners: dict[str, Any] = {}  # kind → autotuned wrapper, built on first CUDA use


def _make_autotuner(kind: str, do_bench: Callable | None = None):
    """An autotuned wrapper around the same ``@triton.jit`` kernel the interpreter launches directly.

    Built on first CUDA use, not at import: with more than one config the autotuner benchmarks on a GPU
    driver, which the interpreter does not have. ``do_bench`` is Triton's (None: the GPU's); tests
    pass a stand-in to check the plumbing on CPU.
    """
    kernel = _fused_lowrank_kernel if kind == "single" else _fused_grouped_lowrank_kernel
    return triton.autotune(
        configs=_autotune_configs(),
        key=_AUTOTUNE_KEYS[kind],
        prune_configs_by={"early_config_prune": _prune_configs},
        do_bench=do_bench,
    )(kernel)


def _use_autotune(device: torch.device) -> bool:
    """Autotune on real GPUs only (the interpreter uses one fixed config)."""
    return device.type == "cuda" and not _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device`` (CUDA with Triton, or anything in the interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or _interpreting()


def _check_kernel_runs(x: torch.Tensor) -> None:
    if triton is None:
        raise ImportError("The fused kernel needs Triton: pip install 'hf_vitcompress[triton]'.")
    if not triton_available(x.device):
        raise RuntimeError(
            f"The fused kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, for tests); got a tensor on "
            f"{x.device}. Use lowrank_linear() / grouped_lowrank_linear(), which fall back to PyTorch."
        )
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"The fused kernel takes float16, bfloat16 or float32 inputs; got {x.dtype}. Cast the inputs, or use "
            f"lowrank_linear() / grouped_lowrank_linear(), which fall back to PyTorch for other dtypes."
        )


def _check_factors(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, what: str = ""
) -> None:
    """Shapes, dtypes and devices that chain: ``x [..., in]``, ``down [r, in]``, ``up [out, r]``, ``bias [out]``."""
    if (
        x.dim() < 1
        or down.dim() != 2
        or up.dim() != 2
        or x.shape[-1] != down.shape[1]
        or up.shape[1] != down.shape[0]
        or (bias is not None and bias.shape != (up.shape[0],))
    ):
        raise ValueError(
            f"Shapes do not chain{what}: x {tuple(x.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}, "
            f"bias {None if bias is None else tuple(bias.shape)}; expected x [..., in], down [rank, in], "
            f"up [out, rank], bias [out]."
        )
    if not x.dtype == down.dtype == up.dtype:
        raise TypeError(f"x, down and up must share a dtype{what}; got {x.dtype}, {down.dtype}, {up.dtype}.")
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"The bias{what} must be in the input dtype {x.dtype} or float32; got {bias.dtype}.")
    devices = {t.device for t in (x, down, up, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, down, up and bias{what} must be on one device; got {sorted(map(str, devices))}.")


def _group_biases(
    downs: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None
) -> list[torch.Tensor | None]:
    if biases is None:
        return [None] * len(downs)
    if len(biases) != len(downs):
        raise ValueError(
            f"Got {len(downs)} factor pairs but {len(biases)} biases; pass one bias (or None) per group, or "
            f"biases=None."
        )
    return list(biases)


def _check_groups(
    x: torch.Tensor,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
) -> list[torch.Tensor | None]:
    if len(downs) not in GROUP_COUNTS or len(ups) != len(downs):
        raise ValueError(
            f"The grouped low-rank linear takes 2 or 3 factor pairs (k/v or q/k/v); got {len(downs)} downs and "
            f"{len(ups)} ups. For one pair use lowrank_linear()."
        )
    biases = _group_biases(downs, biases)
    for g, (down, up, bias) in enumerate(zip(downs, ups, biases, strict=True)):
        _check_factors(x, down, up, bias, what=f" in group {g}")
    return biases


def _block_sizes(block_m: int | None, block_k: int | None, block_n: int | None) -> dict[str, int]:
    blocks = {"BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_N": block_n}
    for name, value in blocks.items():
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(
                f"{name.lower()} must be a power of two ≥ 16 (tl.dot's smallest tile); got {value}. Pass None to "
                f"let the kernel choose."
            )
    return {name: _DEFAULT_BLOCK if value is None else value for name, value in blocks.items()}


def _launch(
    kind: str,
    pointers: list[torch.Tensor],
    rows: int,
    scalars: list[int],
    constexprs: dict,
    blocks: dict[str, int] | None,
) -> None:
    """Launch the raw kernel with fixed blocks, or (``blocks`` None, CUDA) the autotuned wrapper of it."""
    dtype = pointers[0].dtype
    constexprs = {**constexprs, "INTERPRETER": _interpreting(), "IEEE": dtype == torch.float32}
    args = [*pointers, rows, max(16, triton.next_power_of_2(rows)), *scalars]
    if blocks is None:
        if kind not in _autotuners:
            _autotuners[kind] = _make_autotuner(kind)

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(rows, meta["BLOCK_M"]),)

        _autotuners[kind][grid](*args, **constexprs)
    else:
        kernel = _fused_lowrank_kernel if kind == "single" else _fused_grouped_lowrank_kernel
        kernel[(triton.cdiv(rows, blocks["BLOCK_M"]),)](*args, **constexprs, **blocks)


def _block_choice(
    x: torch.Tensor, block_m: int | None, block_k: int | None, block_n: int | None
) -> dict[str, int] | None:
    """None (autotune) on CUDA without overrides; else fixed blocks, the defaults where not given."""
    blocks = _block_sizes(block_m, block_k, block_n)
    if _use_autotune(x.device) and block_m is None and block_k is None and block_n is None:
        return None
    return blocks


def _block_r(rank: int) -> int:
    # Padded to a power of two (tl.arange) and at least 16 (tl.dot's smallest tile); masked past the rank.
    return max(16, triton.next_power_of_2(rank))


def fused_lowrank_linear(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The Triton kernel. ``x [..., in]``, ``down [r, in]``, ``up [out, r]``, ``bias [out]`` → ``[..., out]``.

    ``activation`` (None or one of :data:`EPILOGUE_ACTIVATIONS`) is applied after the bias, in fp32.
    The output has the input dtype. Block sizes: None autotunes on CUDA (keyed on the widths, the padded
    rank and the row count's power-of-two bucket) and uses 64 in the interpreter; a value overrides.
    """
    kind = _canonical_activation(activation)
    _check_kernel_runs(x)
    _check_factors(x, down, up, bias)
    _check_rank(down.shape[0])
    blocks = _block_choice(x, block_m, block_k, block_n)
    rank, in_features = down.shape
    out_features = up.shape[0]
    leading = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.empty(x2.shape[0], out_features, device=x.device, dtype=x.dtype)
    if x2.shape[0] == 0 or out_features == 0:
        return y.reshape(*leading, out_features)
    down, up = down.contiguous(), up.contiguous()
    bias = None if bias is None else bias.contiguous()
    _launch(
        "single",
        [x2, down, up, bias if bias is not None else y, y],  # y: a valid pointer, never read without HAS_BIAS
        x2.shape[0],
        [in_features, out_features, rank, x2.stride(0), down.stride(0), up.stride(0), y.stride(0)],
        {"HAS_BIAS": bias is not None, "ACTIVATION": kind, "BLOCK_R": _block_r(rank)},
        blocks,
    )
    return y.reshape(*leading, out_features)


def fused_grouped_lowrank_linear(
    x: torch.Tensor,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """The grouped Triton kernel: G = 2 or 3 factor pairs on the same ``x`` (k/v or q/k/v), ``x`` read once.

    ``downs[g] [r_g, in]``, ``ups[g] [out_g, r_g]``, ``biases[g] [out_g]`` or None → a tuple of G tensors
    ``[..., out_g]``. Ranks may differ per group (each is padded to the largest one's power of two).
    """
    _check_kernel_runs(x)
    biases = _check_groups(x, downs, ups, biases)
    _check_rank(*(down.shape[0] for down in downs))
    blocks = _block_choice(x, block_m, block_k, block_n)
    groups = len(downs)
    in_features = x.shape[-1]
    leading = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    downs = [d.contiguous() for d in downs]
    ups = [u.contiguous() for u in ups]
    biases = [None if b is None else b.contiguous() for b in biases]
    ys = [torch.empty(x2.shape[0], u.shape[0], device=x.device, dtype=x.dtype) for u in ups]
    if x2.shape[0] > 0:
        # Placeholders for an absent third group: group 0's tensors, never read when GROUPS == 2.
        pad = 3 - groups
        downs_, ups_, ys_ = downs + downs[:1] * pad, ups + ups[:1] * pad, ys + ys[:1] * pad
        biases_ = [b if b is not None else y for b, y in zip(biases + [None] * pad, ys_, strict=True)]
        ranks = [d.shape[0] for d in downs_]
        _launch(
            "grouped",
            [x2, *downs_, *ups_, *biases_, *ys_],
            x2.shape[0],
            [
                in_features,
                *(u.shape[0] for u in ups_),
                *ranks,
                x2.stride(0),
                *(d.stride(0) for d in downs_),
                *(u.stride(0) for u in ups_),
                *(y.stride(0) for y in ys_),
            ],
            {
                "GROUPS": groups,
                **{f"HAS_BIAS{g}": g < groups and biases[g] is not None for g in range(3)},
                "BLOCK_R": _block_r(max(ranks)),
            },
            blocks,
        )
    return tuple(y.reshape(*leading, y.shape[1]) for y in ys)


def _check_rank(*ranks: int) -> None:
    if max(ranks) > MAX_FUSED_RANK:
        raise ValueError(
            f"The fused kernels take ranks up to {MAX_FUSED_RANK} (the padded rank tile must fit on chip); got "
            f"{max(ranks)}. Use lowrank_linear(), which runs PyTorch for larger ranks."
        )


def _fused_can_run(x: torch.Tensor, *ranks: int) -> bool:
    return (
        triton_available(x.device)
        and x.dtype in KERNEL_DTYPES
        and not torch.is_grad_enabled()
        and max(ranks) <= MAX_FUSED_RANK
    )


def lowrank_linear(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Fused kernel where it can run, PyTorch otherwise (same result up to rounding).

    The kernel runs without autograd (it has no backward), for float16/bfloat16/float32 inputs on CUDA
    (or in the interpreter); inputs are checked the same way on both paths so errors do not depend on it.
    """
    _canonical_activation(activation)
    _check_factors(x, down, up, bias)
    if _fused_can_run(x, down.shape[0]):
        return fused_lowrank_linear(x, down, up, bias, activation)
    return lowrank_linear_reference(x, down, up, bias, activation)


def grouped_lowrank_linear(
    x: torch.Tensor,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Grouped fused kernel where it can run (as :func:`lowrank_linear`), PyTorch otherwise."""
    biases = _check_groups(x, downs, ups, biases)
    if _fused_can_run(x, *(down.shape[0] for down in downs)):
        return fused_grouped_lowrank_linear(x, downs, ups, biases)
    return grouped_lowrank_linear_reference(x, downs, ups, biases)


# -- the kernel as a torch.library custom op: what torch.compile keeps in its graph ---------------------------
@torch.library.custom_op(
    "hf_vitcompress::fused_lowrank_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor down, Tensor up, Tensor? bias) -> Tensor",
)
def fused_lowrank_op(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`fused_lowrank_linear` (no activation, blocks autotuned) as the operator
    ``torch.ops.hf_vitcompress.fused_lowrank_linear``.

    Dynamo cannot trace into a Triton launch with an autotuner and a Python-side check of every input, so a
    ``torch.compile``d model would either break its graph at every factorized layer or lose the kernel. As an
    opaque operator with a fake implementation (the output's shape and dtype, below), the compiled graph holds
    one call per layer and runs the kernel. It has no autograd formula: :class:`~hf_vitcompress.LowRankLinear`
    calls it only with gradients off, like the kernel."""
    return fused_lowrank_linear(x, down, up, bias)


@fused_lowrank_op.register_fake
def _fused_lowrank_fake(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    _check_factors(x, down, up, bias)
    return x.new_empty((*x.shape[:-1], up.shape[0]))
