"""``hf-vitcompress``: compress, evaluate, and a demo on the embedded default model.

    hf-vitcompress demo                                   # shipped ViT + Fashion-MNIST, before/after table
    hf-vitcompress compress --model PATH_OR_ID --target-param-ratio 0.5 --calibration DATA --output out/
    hf-vitcompress evaluate --model out/ --data DATA [--baseline PATH_OR_ID] [--json report.json]

DATA is ``default`` (the Fashion-MNIST data shipped with the package, or the full set when
``dataset-fashion-mnist`` is installed), a folder saved with ``datasets.save_to_disk``, a folder of
images in class sub-folders (``imagefolder``), or a ``.pt`` file holding ``{"pixel_values", "labels"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .configuration import CompressionConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default" / "model"


# -- data -------------------------------------------------------------------------------------------
def load_batches(
    spec: str, model_path: str, split: str, limit: int | None, batch_size: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Materialize ``{"pixel_values", "labels"}`` batches from a DATA spec (see the module docstring)."""
    from .data import iterate_batches, load_fashion_mnist

    if spec in ("default", "fashion-mnist"):
        images, labels = load_fashion_mnist("calibration" if split == "calibration" else "test")
        images, labels = images[:limit], labels[:limit]
        return list(iterate_batches(images, labels, batch_size))
    path = Path(spec)
    if not path.exists():
        raise SystemExit(
            f"error: data {spec!r} not found (use 'default', a datasets folder, an image folder or a .pt file)."
        )
    if path.suffix == ".pt":
        data = torch.load(path, weights_only=True)
        pixels, labels = data["pixel_values"][:limit], data.get("labels")
        labels = labels[:limit] if labels is not None else None
        return [
            {
                "pixel_values": pixels[i : i + batch_size],
                **({"labels": labels[i : i + batch_size]} if labels is not None else {}),
            }
            for i in range(0, len(pixels), batch_size)
        ]
    import datasets

    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            key = "train" if split == "calibration" and "train" in dataset else next(iter(dataset))
            dataset = dataset["test"] if split != "calibration" and "test" in dataset else dataset[key]
    else:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    label_column = next((c for c in ("labels", "label") if c in dataset.column_names), None)
    if "pixel_values" not in dataset.column_names:
        image_column = next((c for c in ("image", "img") if c in dataset.column_names), None)
        if image_column is None:
            raise SystemExit(
                f"error: {spec} has neither 'pixel_values' nor an 'image' column (columns: {dataset.column_names})."
            )
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_path)
        dataset = dataset.map(
            lambda batch: {
                "pixel_values": processor([im.convert("RGB") for im in batch[image_column]], return_tensors="np")[
                    "pixel_values"
                ]
            },
            batched=True,
            remove_columns=[image_column],
        )
    dataset = dataset.with_format("torch")
    batches = []
    for batch in dataset.iter(batch_size=batch_size):
        item = {"pixel_values": batch["pixel_values"].float()}
        if label_column is not None:
            item["labels"] = batch[label_column]
        batches.append(item)
    return batches


def load_model(path_or_id: str):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path_or_id).eval()


# -- commands ---------------------------------------------------------------------------------------
def _config_from_args(args: argparse.Namespace) -> CompressionConfig:
    values = {
        f.name: getattr(args, f.name) for f in fields(CompressionConfig) if getattr(args, f.name, None) is not None
    }
    return CompressionConfig(**values)


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from .compress import compress

    model_path = args.model or str(DEFAULT_MODEL_DIR)
    config = _config_from_args(args)
    model = load_model(model_path)
    calibration = load_batches(args.calibration, model_path, "calibration", config.calibration_samples)
    compressed = compress(model, config, calibration_data=calibration, progress=not args.quiet)
    compressed.config.compression_config["base_model"] = model_path  # provenance for evaluate / cards
    output = Path(args.output)
    # Write to a temporary sibling, then move into place: a failed save never leaves a half-written folder.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        compressed.save_pretrained(staging)
        for name in ("preprocessor_config.json",):
            if (Path(model_path) / name).exists():
                shutil.copy(Path(model_path) / name, staging / name)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    plan = compressed.compression_plan
    summary = {
        "output": str(output),
        "dense_parameters": plan.dense_parameters,
        "parameters": plan.parameters,
        "param_ratio": plan.param_ratio,
        "factorized_layers": len(plan.layers),
    }
    print(json.dumps(summary, indent=2))
    return summary


def cmd_evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .evaluation import compare_models, dense_equivalent, format_table

    model = load_model(args.model)
    batches = load_batches(args.data, args.model, "test", args.limit)
    models = {}
    base = args.baseline or (getattr(model.config, "compression_config", None) or {}).get("base_model")
    if base and (Path(base).exists() or args.baseline):
        models["dense"] = load_model(base)
    elif getattr(model.config, "compression_plan", None):
        models["dense (merged factors)"] = dense_equivalent(model)
    models["compressed" if models else "model"] = model
    labelled = all("labels" in batch for batch in batches)
    rows = compare_models(
        models,
        batches[0]["pixel_values"][: args.latency_batch_size],
        eval_batches=batches if labelled else None,
        repeats=args.repeats,
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def cmd_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .compress import compress
    from .data import iterate_batches, load_fashion_mnist
    from .evaluation import compare_models, format_table

    config = _config_from_args(args)
    dense = load_model(str(DEFAULT_MODEL_DIR))
    calibration_images, _ = load_fashion_mnist("calibration")
    test_images, test_labels = load_fashion_mnist("test")
    if args.limit:
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    print(
        f"Embedded default: ViT {dense.config.hidden_size}-wide, {dense.config.num_hidden_layers} blocks, trained on "
        f"Fashion-MNIST; calibrating on {min(len(calibration_images), config.calibration_samples)} training images, "
        f"evaluating on {len(test_images)} test images.",
        flush=True,
    )
    compressed = compress(
        dense,
        config,
        calibration_data=list(iterate_batches(calibration_images, batch_size=64)),
        progress=not args.quiet,
    )
    rows = compare_models(
        {"dense": dense, f"compressed ({config.method}, {config.target_param_ratio:g})": compressed},
        next(iterate_batches(test_images, batch_size=args.latency_batch_size))["pixel_values"],
        eval_batches=list(iterate_batches(test_images, test_labels, batch_size=500)),
        repeats=args.repeats,
    )
    print(format_table(rows))
    if args.output:
        compressed.save_pretrained(args.output)
        print(f"saved to {args.output}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression")
    group.add_argument("--method", choices=["activation_aware"], default=None)
    group.add_argument("--target-param-ratio", dest="target_param_ratio", type=float, default=None)
    group.add_argument("--target-modules", dest="target_modules", nargs="+", default=None)
    group.add_argument("--calibration-samples", dest="calibration_samples", type=int, default=None)
    group.add_argument("--whitening", choices=["gram", "diagonal", "none"], default=None)
    group.add_argument("--gram-shrinkage", dest="gram_shrinkage", type=float, default=None)
    group.add_argument("--rank-allocation", dest="rank_allocation", choices=["global", "uniform"], default=None)
    group.add_argument(
        "--error-normalization", dest="error_normalization", choices=["relative", "absolute"], default=None
    )
    group.add_argument("--sequential", dest="sequential", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--compensation-rank", dest="compensation_rank", type=int, default=None)
    group.add_argument("--compensation-epochs", dest="compensation_epochs", type=int, default=None)
    group.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-vitcompress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    compress_parser = sub.add_parser("compress", help="compress a ViT/DeiT checkpoint and save it")
    compress_parser.add_argument("--model", default=None, help="path or Hub id (default: the embedded default model)")
    compress_parser.add_argument("--calibration", default="default", help="calibration DATA (default: shipped images)")
    compress_parser.add_argument("--output", required=True)
    _add_config_arguments(compress_parser)

    evaluate_parser = sub.add_parser("evaluate", help="top-1, parameters, FLOPs and latency vs the dense model")
    evaluate_parser.add_argument("--model", required=True)
    evaluate_parser.add_argument("--data", default="default")
    evaluate_parser.add_argument(
        "--baseline", default=None, help="dense checkpoint to compare with (default: the recorded base model)"
    )
    evaluate_parser.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")

    demo_parser = sub.add_parser("demo", help="compress the embedded default model and print a before/after table")
    demo_parser.add_argument("--output", default=None, help="also save the compressed model here")
    demo_parser.add_argument("--limit", type=int, default=None, help="evaluate on at most this many test images")
    _add_config_arguments(demo_parser)

    for command in (evaluate_parser, demo_parser):
        command.add_argument("--json", default=None, help="also write the table as JSON")
        command.add_argument("--repeats", type=int, default=20, help="latency repeats (median reported)")
        command.add_argument("--latency-batch-size", dest="latency_batch_size", type=int, default=32)
    for command in (compress_parser, evaluate_parser, demo_parser):
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    handlers = {"compress": cmd_compress, "evaluate": cmd_evaluate, "demo": cmd_demo}
    try:
        handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
