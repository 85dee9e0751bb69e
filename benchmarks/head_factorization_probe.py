"""Probe: head factorization one-shot vs + rank search vs the activation-aware default, no fine-tuning.

A first look used in README (the full attention benchmark, with distillation and the head-pruning
baseline, is ``benchmarks/attention_quality.py``, still to come). Prints top-1 and relative logit error
on the full Fashion-MNIST test set for the embedded default at ratios 0.5 and 0.4.

    python benchmarks/head_factorization_probe.py        # ~3 min on 2 CPU cores
"""

import time

import torch

from hf_vitcompress import CompressionConfig, compress, count_parameters, search_ranks
from hf_vitcompress.cli import load_examples, load_model
from hf_vitcompress.data import DEFAULT_MODEL_DIR, iterate_batches, load_fashion_mnist
from hf_vitcompress.evaluation import topk_accuracies

torch.manual_seed(0)
dense = load_model(str(DEFAULT_MODEL_DIR))
cal, _ = load_fashion_mnist("calibration")
calb = list(iterate_batches(cal, batch_size=64))
px, lab = load_examples("default", str(DEFAULT_MODEL_DIR), "train", None)
held = [{"pixel_values": px[-4096:][i : i + 64], "labels": lab[-4096:][i : i + 64]} for i in range(0, 4096, 64)]
ti, tl = load_fashion_mnist("test")
tb = list(iterate_batches(ti, tl, batch_size=500))
with torch.no_grad():
    ref = torch.cat([dense(pixel_values=b["pixel_values"]).logits for b in tb])


def report(name, m):
    with torch.no_grad():
        out = torch.cat([m(pixel_values=b["pixel_values"]).logits for b in tb])
    print(
        f"{name:34s} params {count_parameters(m) / count_parameters(dense):.3f} top1 {topk_accuracies(m, tb, ks=(1,))['top1'] * 100:.2f} relerr {((out - ref).norm() / ref.norm()).item():.4f}",
        flush=True,
    )


for ratio in (0.5, 0.4):
    one = compress(
        dense, CompressionConfig(method="head_factorization", target_param_ratio=ratio), calb, progress=False
    )
    report(f"head one-shot {ratio}", one)
    t = time.time()
    s = search_ranks(one, dense, held, steps=200, progress=False)
    report(f"head + search {ratio} ({time.time() - t:.0f}s)", s)
    print(
        "  layer0 one-shot",
        one.compression_plan.layers["vit.layers.0.attention"].qk_ranks,
        one.compression_plan.layers["vit.layers.0.attention"].vo_ranks,
    )
    print(
        "  layer0 searched",
        s.compression_plan.layers["vit.layers.0.attention"].qk_ranks,
        s.compression_plan.layers["vit.layers.0.attention"].vo_ranks,
    )
    report(
        f"activation_aware {ratio}", compress(dense, CompressionConfig(target_param_ratio=ratio), calb, progress=False)
    )
