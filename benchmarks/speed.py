"""Does fewer FLOPs mean less time? Per-layer and end-to-end speed of factorized ViTs, on this device.

    python benchmarks/speed.py            # CPU here; on a CUDA machine the fused Triton kernel joins in

Per layer (ViT-B and DeiT-S linear shapes, 197 tokens × batch 1/8/64, ranks 32..384): the dense GEMM,
the two factor GEMMs (PyTorch), and on CUDA the fused kernel, all timed interleaved in one run (median).
End to end: a ViT-B-shaped model (random init, seeded) compressed to 50% parameters by plain weight SVD
(the speed depends only on the shapes) with the global rank allocation and with uniform ranks, timed
dense, factorized, and after ``hf_vitcompress.tune``; the speedup is reported as a fraction of the FLOP
reduction (counted MACs).
CPU: fp32, batch 8 end to end. CUDA: bf16, batch 64. Writes ``speed.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import HERE, update_results_file, vit_b
from torch import nn

from hf_vitcompress import CompressionConfig, compress, tune
from hf_vitcompress.evaluation import count_macs
from hf_vitcompress.kernels.lowrank import MAX_FUSED_RANK, fused_lowrank_linear, triton_available

SHAPES = {  # (model, layer) -> (in, out)
    ("ViT-B", "q/k/v/o"): (768, 768),
    ("ViT-B", "fc1"): (768, 3072),
    ("ViT-B", "fc2"): (3072, 768),
    ("DeiT-S", "q/k/v/o"): (384, 384),
    ("DeiT-S", "fc1"): (384, 1536),
    ("DeiT-S", "fc2"): (1536, 384),
}
RANKS = (32, 64, 128, 256, 384)
BATCHES = (1, 8, 64)
TOKENS = 197


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_milliseconds(functions: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Median ms per call of each function, timed round-robin so that drift hits every variant alike.

    On a GPU each sample is 10 back-to-back calls between synchronizations (a synchronization costs more
    than a small kernel); on a CPU one call.
    """
    calls = 10 if device.type == "cuda" else 1
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                function()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def per_layer(device: torch.device, dtype: torch.dtype, repeats: int, fused: bool) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for (model_name, layer), (n_in, n_out) in SHAPES.items():
        weight = (torch.randn(n_out, n_in, generator=generator) / n_in**0.5).to(device, dtype)
        bias = torch.zeros(n_out, device=device, dtype=dtype)
        for batch in BATCHES:
            x = torch.randn(batch * TOKENS, n_in, generator=generator).to(device, dtype)
            for rank in RANKS:
                if rank > min(n_in, n_out):
                    continue
                down = (torch.randn(rank, n_in, generator=generator) / n_in**0.5).to(device, dtype)
                up = (torch.randn(n_out, rank, generator=generator) / rank**0.5).to(device, dtype)
                functions = {
                    "dense": lambda x=x, weight=weight, bias=bias: nn.functional.linear(x, weight, bias),
                    "two_gemms": lambda x=x, down=down, up=up, bias=bias: nn.functional.linear(
                        nn.functional.linear(x, down), up, bias
                    ),
                }
                if fused and rank <= MAX_FUSED_RANK:  # larger ranks: the kernel refuses (tiles off chip)
                    functions["fused"] = lambda x=x, down=down, up=up, bias=bias: fused_lowrank_linear(
                        x, down, up, bias
                    )
                ms = interleaved_milliseconds(functions, device, repeats)
                row = {
                    "model": model_name,
                    "layer": layer,
                    "in": n_in,
                    "out": n_out,
                    "batch": batch,
                    "rank": rank,
                    "flop_ratio": rank * (n_in + n_out) / (n_in * n_out),
                    **{f"{k}_ms": v for k, v in ms.items()},
                }
                rows.append(row)
                print(
                    f"{model_name:6} {layer:8} b{batch:<3} r{rank:<4} "
                    + " ".join(f"{k} {v:8.3f}" for k, v in ms.items()),
                    flush=True,
                )
    return rows


@torch.no_grad()
def end_to_end(device: torch.device, dtype: torch.dtype, batch: int, repeats: int, allocation: str) -> dict:
    dense = vit_b()
    config = CompressionConfig(
        target_param_ratio=0.5, whitening="none", loss_weighting="none", rank_allocation=allocation, shared_qkv=False
    )  # one factor pair per linear: what the fused kernel serves
    factorized = compress(dense, config, progress=False)
    tuned = compress(dense, config, progress=False)
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    macs = {name: count_macs(m, pixels[:1]) for name, m in (("dense", dense), ("factorized", factorized))}
    models = {"dense": dense, "factorized": factorized, "tuned": tuned}
    for model in models.values():
        model.to(device, dtype)
    pixels = pixels.to(device, dtype)
    timings = tune(tuned, pixels)
    tuned_macs = count_macs(tuned.float().cpu(), pixels[:1].float().cpu())
    tuned.to(device, dtype)
    macs["tuned"] = tuned_macs
    ms = interleaved_milliseconds(
        {name: (lambda m=m: m(pixel_values=pixels)) for name, m in models.items()}, device, repeats, warmup=2
    )
    choices = {c: sum(t.choice == c for t in timings) for c in ("dense", "factorized", "fused")}
    result = {
        "allocation": allocation,
        "factorized_layers": len(factorized.compression_plan.layers),
        "batch": batch,
        "param_ratio": factorized.compression_plan.param_ratio,
        "tuned_param_ratio": tuned.compression_plan.param_ratio,
        "tuned_choices": choices,
        "macs": macs,
        "ms": ms,
    }
    for name in ("factorized", "tuned"):
        speedup = ms["dense"] / ms[name]
        flop_reduction = macs["dense"] / macs[name]
        result[f"{name}_speedup"] = speedup
        result[f"{name}_flop_reduction"] = flop_reduction
        result[f"{name}_fraction_of_flop_reduction"] = speedup / flop_reduction
    print(json.dumps(result, indent=2), flush=True)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def render(results: dict) -> str:
    fused = results["fused"]
    lines = [
        "## Speed: factorized layers vs dense (`python benchmarks/speed.py`)",
        "",
        f"Device: **{results['device']}**, {results['dtype']}, torch {results['torch']}. Medians of "
        f"{results['repeats']} interleaved calls; ratios are from this one run. Per-layer inputs are 197 tokens × batch.",
        "",
        "Per layer: `two GEMMs / dense` is the factorized layer's time relative to the dense GEMM (below 1 = faster), "
        "`FLOPs` the factorized MACs relative to dense"
        + (", `fused vs 2 GEMMs` the speedup of the Triton kernel over the two PyTorch GEMMs." if fused else "."),
        "",
        "| model | layer | batch | rank | FLOPs | dense ms | two GEMMs / dense |"
        + (" fused / dense | fused vs 2 GEMMs |" if fused else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if fused else ""),
    ]
    for row in results["per_layer"]:
        line = (
            f"| {row['model']} | {row['layer']} | {row['batch']} | {row['rank']} | {row['flop_ratio']:.2f} | "
            f"{row['dense_ms']:.3f} | {row['two_gemms_ms'] / row['dense_ms']:.2f} |"
        )
        if fused and "fused_ms" in row:
            line += f" {row['fused_ms'] / row['dense_ms']:.2f} | {row['two_gemms_ms'] / row['fused_ms']:.2f}x |"
        elif fused:
            line += f" – | – (rank > {MAX_FUSED_RANK}) |"
        lines.append(line)
    for e2e in results["end_to_end"]:
        lines += [
            "",
            f"End to end, **{e2e['allocation']} rank allocation**: ViT-B shape (random init), 50% parameters by plain "
            f"SVD ({e2e['factorized_layers']} of 72 block linears factorized, param ratio {e2e['param_ratio']:.3f}), "
            f"batch {e2e['batch']}. `tune` kept "
            + ", ".join(f"{v} {k}" for k, v in e2e["tuned_choices"].items())
            + f" (param ratio after merging: {e2e['tuned_param_ratio']:.3f}).",
            "",
            "| model | GMACs / image | ms / batch | speedup | FLOP reduction | speedup / FLOP reduction |",
            "|---|---|---|---|---|---|",
            f"| dense | {e2e['macs']['dense'] / 1e9:.2f} | {e2e['ms']['dense']:.1f} | 1.00 | 1.00 | – |",
        ]
        for name in ("factorized", "tuned"):
            lines.append(
                f"| {name} | {e2e['macs'][name] / 1e9:.2f} | {e2e['ms'][name]:.1f} | {e2e[f'{name}_speedup']:.2f} | "
                f"{e2e[f'{name}_flop_reduction']:.2f} | **{e2e[f'{name}_fraction_of_flop_reduction']:.2f}** |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default: 5 CPU, 50 GPU)")
    parser.add_argument("--batch", type=int, default=None, help="end-to-end batch (default: 8 CPU, 64 GPU)")
    parser.add_argument("--output", default=str(HERE / "speed.json"))
    parser.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = args.repeats or (50 if cuda else 5)
    fused = cuda and triton_available(device)
    results = {
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "repeats": repeats,
        "fused": fused,
        "per_layer": per_layer(device, dtype, repeats, fused),
        "end_to_end": [
            end_to_end(device, dtype, args.batch or (64 if cuda else 8), repeats, allocation)
            for allocation in ("global", "uniform")
        ],
    }
    Path(args.output).write_text(json.dumps(results, indent=2))
    table = render(results)
    print(table)
    if not args.no_results:
        update_results_file("speed-cuda" if cuda else "speed-cpu", table)


if __name__ == "__main__":
    main()
