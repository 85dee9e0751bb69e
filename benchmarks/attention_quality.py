"""Attention compression at equal whole-model parameters: head products vs separate Q/K/V/O vs head pruning.

The embedded default (ViT width 128, 6 blocks, 4 heads of 32) is compressed to whole-model ratios 0.6
and 0.5. Attention alone cannot reach those ratios, so every variant starts from the *same*
MLP-compressed model (``CompressionConfig(target_modules=["fc1", "fc2"])``, activation-aware, keeping
half of the MLP weights) and differs only in its attention, which gets the same parameter budget:

* ``head products (+search)``: per-head Q·Kᵀ and V·O factorization (``method="head_factorization"``'s
  factorization and allocator), then ``search_ranks`` on 4,096 held-out training images;
* ``separate Q/K/V/O``: the activation-aware method restricted to the four projections (whitened SVD,
  global mixed ranks, same allocator);
* ``head pruning``: whole heads removed by magnitude (‖W_Q^h‖·‖W_K^h‖ + ‖W_V^h‖·‖W_O^h‖), smallest first,
  across all layers, until the budget is met; kept heads are exact.

Each is measured one-shot and after the same short distillation run (soft KD from the dense model).

    python benchmarks/attention_quality.py           # ~15 min on 2 CPU cores; writes RESULTS.md section
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import HERE, short_distillation_arguments, update_results_file
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from hf_vitcompress import (
    CompressionConfig,
    DistillationTrainer,
    compress,
    search_ranks,
)
from hf_vitcompress.budget import DENSE, allocate_global
from hf_vitcompress.calibration.gram import collect_linear_statistics
from hf_vitcompress.cli import load_examples, load_model
from hf_vitcompress.data import DEFAULT_MODEL_DIR, ExampleDataset, iterate_batches, load_fashion_mnist
from hf_vitcompress.evaluation import topk_accuracies
from hf_vitcompress.layers import LowRankLinear
from hf_vitcompress.methods.activation_aware.method import _install
from hf_vitcompress.methods.activation_aware.selection import Factorization, factorize_layers, rank_candidate
from hf_vitcompress.methods.head_factorization.factorization import factorize_attention, install_head_factorized
from hf_vitcompress.methods.head_factorization.method import _head_candidates, head_ranks
from hf_vitcompress.plan import CompressionPlan, LayerPlan, count_parameters

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_names(model) -> list[str]:
    return [f"vit.layers.{i}.attention" for i in range(len(model.vit.layers))]


def attention_parameters(model, names) -> int:
    return sum(sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names)


def finish(model, base, layers: dict[str, LayerPlan]) -> None:
    """Record the composed plan so the model saves, loads and can be searched like any compressed model."""
    plan = CompressionPlan.from_dict(base.config.compression_plan)
    plan.layers.update(layers)
    plan.parameters = count_parameters(model)
    model.config.compression_plan = plan.to_dict()


def head_products(base, dense, names, statistics, budget):
    model = copy.deepcopy(base)
    factorizations = {n: factorize_attention(dense.get_submodule(n), statistics[f"{n}.q_proj"]) for n in names}
    hidden = dense.get_submodule(names[0]).q_proj.in_features
    candidates = [c for n, f in factorizations.items() for c in _head_candidates(n, f, hidden)]
    fixed = sum(dense.get_submodule(n).o_proj.out_features for n in names)  # the output biases stay
    ranks = allocate_global(candidates, budget - fixed)
    layers = {
        name: install_head_factorized(model, name, dense.get_submodule(name), f, *head_ranks(name, f, ranks))
        for name, f in factorizations.items()
    }
    finish(model, base, layers)
    return model


def separate_projections(base, dense, names, statistics, budget):
    model = copy.deepcopy(base)
    targets = [f"{n}.{p}" for n in names for p in PROJECTIONS]
    shared = {t: statistics[t.rsplit(".", 1)[0] + (".o_proj" if t.endswith("o_proj") else ".q_proj")] for t in targets}
    config = CompressionConfig(whitening="gram", compensation_rank=0)
    svds = factorize_layers(dense, targets, shared, Factorization(config.whitening), config)
    candidates = [rank_candidate(t, dense.get_submodule(t), svds[t], "relative") for t in targets]
    biases = sum(dense.get_submodule(t).out_features for t in targets)
    ranks = allocate_global(candidates, budget - biases)
    layers = {}
    for t in targets:  # the base model's attention is still dense
        if ranks[t] is not DENSE:
            module: LowRankLinear = _install(model, t, svds[t], ranks[t])
            layers[t] = LayerPlan("low_rank", module.in_features, module.out_features, True, module.rank)
    finish(model, base, layers)
    return model


@torch.no_grad()
def head_pruning(base, dense, names, budget):
    model = copy.deepcopy(base)
    scores = []
    for name in names:
        attention = dense.get_submodule(name)
        d = attention.head_dim
        for h in range(attention.num_attention_heads):
            rows = slice(h * d, (h + 1) * d)
            qk = attention.q_proj.weight[rows].norm() * attention.k_proj.weight[rows].norm()
            vo = attention.v_proj.weight[rows].norm() * attention.o_proj.weight[:, rows].norm()
            scores.append((float(qk + vo), name, h))
    hidden = dense.get_submodule(names[0]).q_proj.in_features
    head_dim = dense.get_submodule(names[0]).head_dim
    per_head = head_dim * (2 * hidden + 1) + head_dim * 2 * hidden  # a kept head, exact, as factors
    kept = {(n, h) for _, n, h in scores}
    fixed = hidden * len(names)
    for _, name, h in sorted(scores):  # smallest first, keeping at least one head per attention
        if fixed + per_head * len(kept) <= budget:
            break
        if sum(1 for n, _ in kept if n == name) > 1:
            kept.discard((name, h))
    layers = {}
    for name in names:
        attention = dense.get_submodule(name)
        heads = attention.num_attention_heads
        vo = [head_dim if (name, h) in kept else 0 for h in range(heads)]
        layers[name] = install_head_factorized(
            model, name, attention, factorize_attention(attention, None), [head_dim] * heads, vo
        )
    finish(model, base, layers)
    return model


def distill(student, teacher, train, args) -> float:
    with tempfile.TemporaryDirectory() as output:
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            args=short_distillation_arguments(output, args.steps),
            train_dataset=train,
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
    return time.perf_counter() - start


def run(args) -> dict:
    dense = load_model(str(DEFAULT_MODEL_DIR))
    total = count_parameters(dense)
    calibration, _ = load_fashion_mnist("calibration")
    calibration_batches = [b["pixel_values"] for b in iterate_batches(calibration[:512], batch_size=64)]
    pixels, labels = load_examples("default", str(DEFAULT_MODEL_DIR), "train", None)
    search = [
        {"pixel_values": pixels[-4096:][i : i + 64], "labels": labels[-4096:][i : i + 64]} for i in range(0, 4096, 64)
    ]
    train = ExampleDataset(pixels[:-4096], labels[:-4096])
    test_images, test_labels = load_fashion_mnist("test")
    test = list(iterate_batches(test_images, test_labels, batch_size=500))
    names = attention_names(dense)
    mlp = [f"vit.layers.{i}.mlp.{p}" for i in range(len(names)) for p in ("fc1", "fc2")]
    mlp_dense = sum(sum(p.numel() for p in dense.get_submodule(n).parameters()) for n in mlp)
    statistics = collect_linear_statistics(
        dense, [f"{n}.{p}" for n in names for p in ("q_proj", "o_proj")], calibration_batches
    )
    base = compress(
        dense,
        CompressionConfig(target_modules=["fc1", "fc2"], target_param_ratio=(total - 0.5 * mlp_dense) / total),
        [{"pixel_values": b} for b in calibration_batches],
        progress=False,
    )
    results = {
        "dense_top1": topk_accuracies(dense, test, ks=(1,))["top1"],
        "mlp_kept": 1 - (total - count_parameters(base)) / mlp_dense,
        "ratios": {},
    }
    for ratio in args.ratios:
        budget = int(ratio * total) - (count_parameters(base) - attention_parameters(base, names))
        variants = {}
        heads = head_products(base, dense, names, statistics, budget)
        heads.config.compression_config = {**heads.config.compression_config, "target_param_ratio": ratio}
        variants["head products (+search)"] = search_ranks(
            heads, dense, search, target_param_ratio=ratio, steps=200, progress=False
        )
        variants["separate Q/K/V/O"] = separate_projections(base, dense, names, statistics, budget)
        variants["head pruning"] = head_pruning(base, dense, names, budget)
        row = {}
        for name, model in variants.items():
            before = topk_accuracies(model, test, ks=(1,))["top1"]
            seconds = distill(model, dense, train, args)
            after = topk_accuracies(model, test, ks=(1,))["top1"]
            row[name] = {
                "param_ratio": count_parameters(model) / total,
                "before": before,
                "after": after,
                "seconds": seconds,
            }
            print(
                f"ratio {ratio}: {name}: params {row[name]['param_ratio']:.3f} top-1 {100 * before:.2f} -> {100 * after:.2f}",
                flush=True,
            )
        results["ratios"][str(ratio)] = row
    return results


def markdown(results: dict, steps: int) -> str:
    lines = [
        "## Attention at equal parameters (`benchmarks/attention_quality.py`)",
        "",
        f"Command: `python benchmarks/attention_quality.py` (CPU). Every variant starts from the same model whose MLP "
        f"linears keep {100 * results['mlp_kept']:.0f}% of their weights (activation-aware); its attention then gets the "
        "same parameter budget. Top-1 in % on the 10,000 Fashion-MNIST test images, one-shot and after "
        f"{steps} steps of soft-KD distillation (batch 64, lr 1e-4) from the dense model. Dense: "
        f"**{100 * results['dense_top1']:.2f}%**. One seed; about 0.36 points is one standard error.",
        "",
        "| whole-model ratio | variant | params kept | one-shot | after distillation |",
        "|---|---|---|---|---|",
    ]
    for ratio, row in results["ratios"].items():
        best = max(v["after"] for v in row.values())
        for name, values in row.items():
            after = f"**{100 * values['after']:.2f}**" if values["after"] == best else f"{100 * values['after']:.2f}"
            lines.append(f"| {ratio} | {name} | {values['param_ratio']:.3f} | {100 * values['before']:.2f} | {after} |")
    gaps = [
        row["head products (+search)"]["after"] - row["separate Q/K/V/O"]["after"] for row in results["ratios"].values()
    ]
    lines += [
        "",
        "Reading (computed from the table): head products minus separate Q/K/V/O after distillation is "
        + ", ".join(f"{100 * g:+.2f}" for g in gaps)
        + " points at the ratios above, "
        + (
            "within one standard error: the two cannot be told apart here"
            if max(abs(g) for g in gaps) < 0.0036
            else "beyond one standard error"
        )
        + ". The target (head products beat both baselines) is "
        + ("met" if min(gaps) > 0 else "**not met** on this model")
        + ". Head pruning (whole heads, so its budget is met from below) is far behind at both ratios.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.5])
    parser.add_argument("--json", default=str(HERE / "attention_quality.json"))
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results = json.loads(Path(args.json).read_text()) if args.render else run(args)
    if not args.render:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results, args.steps))
    update_results_file("attention_quality", markdown(results, args.steps))


if __name__ == "__main__":
    main()
