"""Measure what compression bought: top-1, parameters, FLOPs and CPU latency, dense vs compressed.

FLOPs are counted as multiply-accumulates (MACs) per image, the convention of the ViT papers
(DeiT-S ≈ 4.6 G): every linear and convolution *and* the two attention matmuls (QKᵀ and A·V),
measured with hooks on a real forward pass so that whatever the model really runs is counted.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layers import LowRankLinear
from .plan import count_parameters, set_submodule


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


@torch.no_grad()
def count_macs(model: nn.Module, pixel_values: torch.Tensor) -> int:
    """Multiply-accumulates per image of one forward pass on ``pixel_values``."""
    total = 0

    def linear_hook(module: nn.Linear, args: tuple, _output: Any) -> None:
        nonlocal total
        total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def conv_hook(module: nn.Conv2d, _args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * kernel

    def attention_hook(module: nn.Module, args: tuple, _output: Any) -> None:
        nonlocal total
        batch, tokens = args[0].shape[0], args[0].shape[1]
        total += batch * tokens * tokens * (module.q_proj.out_features + module.v_proj.out_features)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif _is_attention(module):
            handles.append(module.register_forward_hook(attention_hook))
    try:
        model(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return total // pixel_values.shape[0]


@torch.no_grad()
def measure_latency(
    models: dict[str, nn.Module], pixel_values: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per forward for each model, timed *interleaved* in one run so that ratios are fair."""
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(pixel_values=pixel_values)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(pixel_values=pixel_values)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Top-1 accuracy over ``{"pixel_values", "labels"}`` batches."""
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(pixel_values=batch["pixel_values"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    if total == 0:
        raise ValueError("No labelled evaluation data: top-1 needs batches with 'labels'.")
    return correct / total


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``LowRankLinear`` merged back into a dense ``nn.Linear``.

    Same function and same architecture as the uncompressed model: the fair latency/FLOPs baseline
    when the original dense checkpoint is not at hand.
    """
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(dense, name, module.merge())
    return dense


def compare_models(
    models: dict[str, nn.Module],
    example_pixels: torch.Tensor,
    eval_batches: Iterable[dict[str, torch.Tensor]] | None = None,
    reference: str | None = None,
    repeats: int = 20,
) -> list[dict[str, Any]]:
    """One row per model: parameters, MACs, latency (and top-1 when labelled data is given), plus
    ratios against ``reference`` (the first model by default), all measured in this one call."""
    reference = reference or next(iter(models))
    batches = list(eval_batches) if eval_batches is not None else None
    latency = measure_latency(models, example_pixels, repeats=repeats)
    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {
            "model": name,
            "parameters": count_parameters(model),
            "macs": count_macs(model, example_pixels[:1]),
            "latency_s": latency[name],
        }
        if batches is not None:
            row["top1"] = top1_accuracy(model, batches)
        rows.append(row)
    base = next(row for row in rows if row["model"] == reference)
    for row in rows:
        row["param_ratio"] = row["parameters"] / base["parameters"]
        row["macs_ratio"] = row["macs"] / base["macs"]
        row["speedup"] = base["latency_s"] / row["latency_s"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`compare_models` rows."""
    header = ["model", "params", "ratio", "GMACs/img", "ratio", "latency ms", "speedup"]
    has_top1 = any("top1" in row for row in rows)
    if has_top1:
        header.append("top-1")
    lines = []
    for row in rows:
        cells = [
            row["model"],
            f"{row['parameters']:,}",
            f"{row['param_ratio']:.3f}",
            f"{row['macs'] / 1e9:.4f}",
            f"{row['macs_ratio']:.3f}",
            f"{row['latency_s'] * 1e3:.2f}",
            f"{row['speedup']:.2f}x",
        ]
        if has_top1:
            cells.append(f"{100 * row['top1']:.2f}%" if "top1" in row else "-")
        lines.append(cells)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def render(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(cells) for cells in lines])
