"""The fused kernels on a real GPU: correctness in fp16 / bf16 / fp32 against a float64 reference, and
``torch.compile`` keeping the kernel (the custom op) in a compressed model. Part of ``benchmarks/gpu_check.sh``.

The tests check the kernels under the Triton interpreter on CPU, where bf16 ``tl.dot`` is wrong and autotuning
cannot run; this is the same check on CUDA with the autotuner on. Each case compares the kernel's relative error
(Frobenius norm, against float64) with the two-GEMM PyTorch path's in the same dtype: the kernel passes when its
error is at most twice PyTorch's plus a small floor (it rounds the intermediate once, as PyTorch does).

    python benchmarks/gpu_kernels.py --json gpu_kernels.json      # ~1-2 min on one H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when not installed
from hf_vitcompress.kernels import lowrank  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FLOOR = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}
SHAPES = [(768, 768), (768, 3072), (3072, 768), (384, 1536)]  # ViT-B / DeiT-S linears
RANKS = [16, 64, 128, 256]
ROWS = [1, 197, 64 * 197]


def relative(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.double() - reference).norm() / reference.norm().clamp_min(1e-30))


FIXED_BLOCKS = {"block_m": 64, "block_k": 32, "block_n": 64}  # fit on chip at rank 256 in fp32 too


def _autotuned(dtype_name: str, activation: str | None, rows: int) -> bool:
    """Which cases go through the autotuner (each new key benchmarks every config, so only a subset: what the
    models serve, bf16 without an epilogue activation); the rest run one fixed config."""
    return dtype_name == "bfloat16" and activation is None and rows > 1


def single_cases(device: torch.device) -> list[dict]:
    cases = []
    generator = torch.Generator().manual_seed(0)
    for n_in, n_out in SHAPES:
        for rank in RANKS:
            for rows in ROWS:
                x = torch.randn(rows, n_in, generator=generator, dtype=torch.float64)
                down = torch.randn(rank, n_in, generator=generator, dtype=torch.float64) / n_in**0.5
                up = torch.randn(n_out, rank, generator=generator, dtype=torch.float64) / rank**0.5
                bias = torch.randn(n_out, generator=generator, dtype=torch.float64)
                for activation in (None, "gelu"):
                    reference = lowrank.lowrank_linear_reference(
                        x.to(device), down.to(device), up.to(device), bias.to(device), activation
                    )
                    for name, dtype in DTYPES.items():
                        autotuned = _autotuned(name, activation, rows)
                        case = {
                            "kind": "single",
                            "in": n_in,
                            "out": n_out,
                            "rank": rank,
                            "rows": rows,
                            "activation": activation,
                            "dtype": name,
                            "autotuned": autotuned,
                        }
                        args = [t.to(device, dtype) for t in (x, down, up, bias)]
                        try:
                            fused = lowrank.fused_lowrank_linear(
                                *args, activation, **({} if autotuned else FIXED_BLOCKS)
                            )
                        except Exception as error:  # e.g. out of resources: recorded as a failure, the rest goes on
                            cases.append({**case, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]})
                            continue
                        pytorch = lowrank.lowrank_linear_reference(*args, activation)
                        error, baseline = relative(fused, reference), relative(pytorch, reference)
                        cases.append(
                            {
                                **case,
                                "kernel_error": error,
                                "pytorch_error": baseline,
                                "ok": error <= 2 * baseline + FLOOR[name],
                            }
                        )
    return cases


def grouped_cases(device: torch.device) -> list[dict]:
    cases = []
    generator = torch.Generator().manual_seed(1)
    for ranks in ([64, 64, 64], [32, 96, 128], [128, 256]):
        for rows in ROWS:
            n_in = 768
            x = torch.randn(rows, n_in, generator=generator, dtype=torch.float64)
            downs = [torch.randn(r, n_in, generator=generator, dtype=torch.float64) / n_in**0.5 for r in ranks]
            ups = [torch.randn(768, r, generator=generator, dtype=torch.float64) / r**0.5 for r in ranks]
            biases = [torch.randn(768, generator=generator, dtype=torch.float64) for _ in ranks]
            references = lowrank.grouped_lowrank_linear_reference(
                x.to(device), [d.to(device) for d in downs], [u.to(device) for u in ups], [b.to(device) for b in biases]
            )
            for name, dtype in DTYPES.items():
                cast = [[t.to(device, dtype) for t in group] for group in (downs, ups, biases)]
                blocks = {} if _autotuned(name, None, rows) else FIXED_BLOCKS
                try:
                    fused = lowrank.fused_grouped_lowrank_linear(x.to(device, dtype), *cast, **blocks)
                except Exception as error:
                    cases.append(
                        {
                            "kind": "grouped",
                            "ranks": ranks,
                            "rows": rows,
                            "dtype": name,
                            "ok": False,
                            "error": f"{type(error).__name__}: {error}"[:300],
                        }
                    )
                    continue
                pytorch = lowrank.grouped_lowrank_linear_reference(x.to(device, dtype), *cast)
                for g, (y, p, reference) in enumerate(zip(fused, pytorch, references, strict=True)):
                    error, baseline = relative(y, reference), relative(p, reference)
                    cases.append(
                        {
                            "kind": "grouped",
                            "ranks": ranks,
                            "group": g,
                            "rows": rows,
                            "dtype": name,
                            "kernel_error": error,
                            "pytorch_error": baseline,
                            "ok": error <= 2 * baseline + FLOOR[name],
                        }
                    )
    return cases


@torch.no_grad()
def compiled_model(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, batch: int = 64, image_size: int = 224, **sizes
) -> dict:
    """A compressed ViT-B-shaped model with every factor pair on the kernel, compiled with inductor: the custom op
    must be in the compiled graph once per factorized layer, and the outputs must match eager."""
    from transformers import ViTConfig, ViTForImageClassification

    from hf_vitcompress import CompressionConfig, LowRankLinear, compress

    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(num_labels=1000, image_size=image_size, **sizes)).eval()
    config = CompressionConfig(
        target_param_ratio=0.5, whitening="none", loss_weighting="none", rank_allocation="uniform", shared_qkv=False
    )
    model = compress(dense, config, progress=False).to(device, dtype)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear) and m.rank <= lowrank.MAX_FUSED_RANK]
    for layer in layers:
        layer.implementation = "fused"
    pixels = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    eager = model(pixel_values=pixels).logits
    calls = []
    real = lowrank.fused_lowrank_linear
    lowrank.fused_lowrank_linear = lambda *a: calls.append(1) or real(*a)
    try:
        start = time.time()
        compiled = torch.compile(model)
        got = compiled(pixel_values=pixels).logits
        compile_seconds = time.time() - start
        calls_per_forward = len(calls)
    finally:
        lowrank.fused_lowrank_linear = real

    def milliseconds(function, repeats: int = 20) -> float:
        for _ in range(3):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start) / repeats

    dense = dense.to(device, dtype)
    compiled_dense = torch.compile(dense)
    timings = {
        "dense eager": milliseconds(lambda: dense(pixel_values=pixels)),
        "dense compiled": milliseconds(lambda: compiled_dense(pixel_values=pixels)),
        "fused eager": milliseconds(lambda: model(pixel_values=pixels)),
        "fused compiled": milliseconds(lambda: compiled(pixel_values=pixels)),
    }
    return {
        "fused_layers": len(layers),
        "kernel_calls_in_one_compiled_forward": calls_per_forward,
        "ok": calls_per_forward == len(layers) and relative(got, eager.double()) < 2e-2,
        "relative_difference_compiled_vs_eager": relative(got, eager.double()),
        "compile_seconds": compile_seconds,
        "setup": f"batch {batch}, {image_size} px, {str(dtype).removeprefix('torch.')}",
        "ms": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="gpu_kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_kernels.py runs on a CUDA GPU, without TRITON_INTERPRET.")
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    for name, function in (("single", single_cases), ("grouped", grouped_cases), ("compiled", compiled_model)):
        start = time.time()
        try:
            result[name] = function(device)
        except Exception as error:  # record and go on: the other checks still tell something
            result[name] = {"error": f"{type(error).__name__}: {error}"}
        result[f"{name}_seconds"] = time.time() - start
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    for name in ("single", "grouped"):
        cases = result[name]
        if isinstance(cases, list):
            bad = [c for c in cases if not c["ok"]]
            worst = {
                d: max((c.get("kernel_error", float("nan")) for c in cases if c["dtype"] == d), default=None)
                for d in DTYPES
            }
            print(f"{name}: {len(cases) - len(bad)}/{len(cases)} ok; worst kernel error per dtype {worst}")
            for case in bad[:10]:
                print("  FAILED", case)
        else:
            print(f"{name}: {cases}")
    print("compiled:", json.dumps(result["compiled"], indent=2))


if __name__ == "__main__":
    main()
