"""Head factorization one-shot vs + rank search vs the activation-aware default, no fine-tuning.

The embedded default is compressed to whole-model parameter ratios 0.5 and 0.4 with
``method="head_factorization"`` (one-shot allocation), then its per-head ranks are searched with
``search_ranks`` (200 steps on the last 4,096 images of the *training* split) once per search seed, and
compared with ``CompressionConfig(target_param_ratio=r)`` (the activation-aware default). Top-1 and
relative logit error ‖Δlogits‖/‖logits‖ against the dense model on the Fashion-MNIST test set (the full
10k when installed). Several search seeds (different Gumbel noise streams) show how noisy the search is.
The full attention benchmark, with distillation and the head-pruning baseline, is
``benchmarks/attention_quality.py``.

    python benchmarks/head_factorization_probe.py     # ~5 min on 2 idle CPU cores; writes JSON + RESULTS.md section
    python benchmarks/head_factorization_probe.py --render   # only rebuild the RESULTS.md section from the JSON

Needs the full Fashion-MNIST (``apt-get install dataset-fashion-mnist``, or ``HF_VITCOMPRESS_FASHION_MNIST``
pointing at its IDX files): the search runs on held-out training images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import HERE, run_environment, update_results_file
from transformers.utils import logging as hf_logging

from hf_vitcompress import CompressionConfig, compress, count_parameters, search_ranks
from hf_vitcompress.cli import load_examples, load_model
from hf_vitcompress.data import DEFAULT_MODEL_DIR, iterate_batches, load_fashion_mnist

COMMAND = "python benchmarks/head_factorization_probe.py"


@torch.no_grad()
def logits_of(model, batches) -> torch.Tensor:
    return torch.cat([model(pixel_values=b["pixel_values"]).logits for b in batches])


def rank_totals(model) -> dict:
    """Sum over every head-factorized attention of its query·key and value·output ranks."""
    layers = model.compression_plan.layers.values()
    heads = [layer for layer in layers if layer.kind == "head_factorized"]
    return {"qk": sum(sum(layer.qk_ranks) for layer in heads), "vo": sum(sum(layer.vo_ranks) for layer in heads)}


def run(args) -> dict:
    torch.manual_seed(0)
    dense = load_model(str(DEFAULT_MODEL_DIR))
    calibration, _ = load_fashion_mnist("calibration")
    calibration_batches = list(iterate_batches(calibration, batch_size=64))
    pixels, labels = load_examples("default", str(DEFAULT_MODEL_DIR), "train", None)
    if len(pixels) < 4096 * 2:
        raise SystemExit("needs the full Fashion-MNIST training set (see the module docstring)")
    held_out = [
        {"pixel_values": pixels[-4096:][i : i + 64], "labels": labels[-4096:][i : i + 64]} for i in range(0, 4096, 64)
    ]
    test_images, test_labels = load_fashion_mnist("test")
    test = list(iterate_batches(test_images, test_labels, batch_size=500))
    target = torch.cat([b["labels"] for b in test])
    reference = logits_of(dense, test)

    def measure(model) -> dict:
        logits = logits_of(model, test)
        return {
            "param_ratio": count_parameters(model) / count_parameters(dense),
            "top1": float((logits.argmax(-1) == target).float().mean()),
            "logit_error": float((logits - reference).norm() / reference.norm()),
        }

    results = {
        "environment": run_environment(),
        "test_images": len(test_images),
        "dense_top1": float((reference.argmax(-1) == target).float().mean()),
        "search_steps": args.steps,
        "search_images": 4096,
        "ratios": {},
    }
    for ratio in args.ratios:
        start = time.perf_counter()
        one_shot = compress(
            dense,
            CompressionConfig(method="head_factorization", target_param_ratio=ratio),
            calibration_batches,
            progress=False,
        )
        row = {
            "one-shot": {**measure(one_shot), "ranks": rank_totals(one_shot), "seconds": time.perf_counter() - start}
        }
        for seed in args.seeds:
            start = time.perf_counter()
            searched = search_ranks(one_shot, dense, held_out, steps=args.steps, seed=seed, progress=False)
            seconds = time.perf_counter() - start
            row[f"search seed {seed}"] = {**measure(searched), "ranks": rank_totals(searched), "seconds": seconds}
        start = time.perf_counter()
        default = compress(dense, CompressionConfig(target_param_ratio=ratio), calibration_batches, progress=False)
        row["activation_aware default"] = {**measure(default), "seconds": time.perf_counter() - start}
        results["ratios"][str(ratio)] = row
        for name, values in row.items():
            print(
                f"ratio {ratio}: {name:26s} params {values['param_ratio']:.3f} top-1 {100 * values['top1']:.2f} "
                f"logit error {values['logit_error']:.4f} ({values['seconds']:.0f} s)",
                flush=True,
            )
    return results


def markdown(results: dict) -> str:
    environment = results["environment"]
    seeds = [name for name in next(iter(results["ratios"].values())) if name.startswith("search seed")]
    lines = [
        "## Head factorization: one-shot vs rank search (`benchmarks/head_factorization_probe.py`)",
        "",
        f"Command: `{COMMAND}` ({environment['description']}). The embedded default compressed with "
        '`CompressionConfig(method="head_factorization", target_param_ratio=r)` (one-shot allocation), then '
        f"`search_ranks` ({results['search_steps']} steps on the last {results['search_images']:,} training images) "
        "once per search seed, next to `CompressionConfig(target_param_ratio=r)` (the activation-aware default). "
        "No fine-tuning. Top-1 in % and, in brackets, the relative logit error against the dense model on "
        f"{results['test_images']:,} Fashion-MNIST test images (dense **{100 * results['dense_top1']:.2f}%**). "
        "`qk / vo` is the sum over all attentions of the query·key and value·output ranks.",
        "",
        "| ratio | variant | params kept | top-1 (logit error) | qk / vo ranks | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for ratio, row in results["ratios"].items():
        for name, values in row.items():
            ranks = f"{values['ranks']['qk']} / {values['ranks']['vo']}" if "ranks" in values else "–"
            lines.append(
                f"| {ratio} | {name} | {values['param_ratio']:.3f} | {100 * values['top1']:.2f} "
                f"({values['logit_error']:.4f}) | {ranks} | {values['seconds']:.0f} |"
            )
    lines += ["", "Reading (computed from the table):", ""]
    for ratio, row in results["ratios"].items():
        base = row["one-shot"]["logit_error"]
        changes = ", ".join(f"{100 * (row[s]['logit_error'] / base - 1):+.0f}%" for s in seeds)
        lines.append(f"- ratio {ratio}: the search changes the one-shot logit error by {changes} ({', '.join(seeds)}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="search seeds (Gumbel noise streams)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", default=str(HERE / "head_factorization_probe.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    if args.render:
        results = json.loads(Path(args.json).read_text())
    else:
        results = run(args)
        results["wall_seconds"] = time.perf_counter() - start
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    print(text)
    update_results_file("head_factorization_probe", text)


if __name__ == "__main__":
    main()
