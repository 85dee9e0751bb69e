"""``hf-vitcompress``: compress, evaluate, and a demo on the embedded default model.

    hf-vitcompress demo                                   # shipped ViT + Fashion-MNIST, before/after table
    hf-vitcompress compress --model PATH_OR_ID --target-param-ratio 0.5 --calibration DATA --output out/
    hf-vitcompress evaluate --model out/ --data DATA [--baseline PATH_OR_ID] [--json report.json] [--record]
    hf-vitcompress finetune --model out/ --output out-ft/ [--teacher PATH_OR_ID] [--max-steps 300] [--kind soft]
    hf-vitcompress search-ranks --model hf/ --output hf-searched/   # per-head ranks (method head_factorization)
    hf-vitcompress card --model out-ft/                   # writes out-ft/README.md (measured numbers only)
    hf-vitcompress push --model out-ft/ --repo-id user/name
    hf-vitcompress export --model out-ft/ --format onnx --output out-onnx/ [--int8]   # checked with onnxruntime

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
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .configuration import (
    ALLOCATION_CHOICES,
    LOSS_WEIGHTING_CHOICES,
    SUPPORTED_METHODS,
    WHITENING_CHOICES,
    CompressionConfig,
)
from .data import DEFAULT_MODEL_DIR, SHIPPED_CALIBRATION_DESCRIPTION
from .export import OnnxExportError


# -- data -------------------------------------------------------------------------------------------
def load_examples(
    spec: str, model_path: str, split: str, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pixel_values [n, C, H, W], labels [n] or None)`` from a DATA spec (see the module docstring).

    ``split`` is ``calibration``, ``train`` or ``test``. For ``default``, ``train`` is the full
    Fashion-MNIST training set when installed, else the 1,024 shipped training images.
    """
    from .data import load_fashion_mnist, to_pixel_values

    if spec in ("default", "fashion-mnist"):
        if split == "train":
            try:
                images, labels = load_fashion_mnist("train")
            except FileNotFoundError:
                print("note: full Fashion-MNIST not installed; training on the 1,024 shipped images", file=sys.stderr)
                images, labels = load_fashion_mnist("calibration")
        else:
            images, labels = load_fashion_mnist("calibration" if split == "calibration" else "test")
        images, labels = images[:limit], labels[:limit]
        return to_pixel_values(images), torch.from_numpy(labels)
    path = Path(spec)
    if not path.exists():
        raise SystemExit(
            f"error: data {spec!r} not found (use 'default', a datasets folder, an image folder or a .pt file)."
        )
    if path.suffix == ".pt":
        data = torch.load(path, weights_only=True)
        labels = data.get("labels")
        return data["pixel_values"][:limit].float(), labels[:limit] if labels is not None else None
    import datasets

    if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            wanted = "test" if split == "test" else "train"
            dataset = dataset[wanted] if wanted in dataset else dataset[next(iter(dataset))]
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
    columns = dataset.with_format("torch")[:]
    return columns["pixel_values"].float(), columns[label_column] if label_column is not None else None


def load_batches(
    spec: str, model_path: str, split: str, limit: int | None, batch_size: int = 64
) -> list[dict[str, torch.Tensor]]:
    """``{"pixel_values", "labels"}`` batches of a DATA spec (what ``compress`` and ``evaluate`` take)."""
    pixels, labels = load_examples(spec, model_path, split, limit)
    return [
        {
            "pixel_values": pixels[i : i + batch_size],
            **({"labels": labels[i : i + batch_size]} if labels is not None else {}),
        }
        for i in range(0, len(pixels), batch_size)
    ]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(path_or_id: str, dtype: str | None = None, classifier: bool = True):
    """The checkpoint in ``dtype`` (default ``"auto"``: the dtype it was saved in, which is what transformers 5
    loads; a bfloat16 checkpoint stays bfloat16 and compresses as such).

    With ``classifier`` (the commands that measure top-1 or train on labels) it is an image classifier, and a
    checkpoint saved as a backbone is refused rather than given a random head. Otherwise (``compress``, ``card``,
    ``push``) it is the kind of model its config's ``architectures`` names: a ``Dinov2Model`` is compressed as a
    backbone, a ``Dinov2Backbone`` as a backbone, a classifier as a classifier."""
    from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(path_or_id)
    architectures = list(getattr(config, "architectures", None) or [])
    is_classifier = not architectures or any("ForImageClassification" in name for name in architectures)
    if classifier and not is_classifier:
        raise ValueError(
            f"{path_or_id} is saved as {architectures[0]}, which has no image classifier, and this command "
            "measures top-1 or trains on labels. Give it a ...ForImageClassification checkpoint; `compress`, `card` "
            "and `push` take backbones too."
        )
    if is_classifier:
        auto = AutoModelForImageClassification
    elif any(name.endswith("Backbone") for name in architectures):
        # AutoBackbone.from_pretrained treats every local folder as a timm name (transformers 5.24), so the class
        # it maps this config to loads the folder itself.
        auto = AutoBackbone._model_mapping[type(config)]
    else:
        auto = AutoModel
    return auto.from_pretrained(path_or_id, config=config, dtype=dtype or "auto").eval()


# -- commands ---------------------------------------------------------------------------------------
def _config_from_args(args: argparse.Namespace) -> CompressionConfig:
    values = {
        f.name: getattr(args, f.name) for f in fields(CompressionConfig) if getattr(args, f.name, None) is not None
    }
    return CompressionConfig(**values)


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    """Compress and save. Under ``accelerate launch`` every process calibrates on its share of the
    images (on its own device) and ends with the same model; the main process saves it."""
    from .calibration.distributed import CalibrationProcesses
    from .compress import compress

    model_path = args.model or str(DEFAULT_MODEL_DIR)
    config = _config_from_args(args)
    model = load_model(model_path, args.dtype, classifier=False)
    if args.tune and config.method == "pruning":
        raise ValueError("--tune chooses how factorized layers run; method 'pruning' leaves none (drop --tune).")
    processes = CalibrationProcesses.current()
    if processes.is_distributed:  # each process on its own device
        from accelerate import PartialState

        if args.device != "cpu":
            print(f"note: --device {args.device} is ignored under accelerate launch (each process uses its own).")
        model.to(PartialState().device)
    else:
        model.to(args.device)
    calibration = load_batches(args.calibration, model_path, "calibration", config.calibration_samples)
    examples = None
    if args.tune:  # checked before the compression runs, not after
        examples = torch.cat([batch["pixel_values"] for batch in calibration])[: args.tune_batch_size]
        if len(examples) < args.tune_batch_size:
            raise ValueError(
                f"--tune-batch-size {args.tune_batch_size} is more than the {len(examples)} calibration images; "
                "lower it or raise --calibration-samples."
            )
    compressed = compress(
        model, config, calibration_data=calibration, progress=not args.quiet, distributed=processes.is_distributed
    )
    compressed.config.compression_provenance["calibration_data"] = (
        SHIPPED_CALIBRATION_DESCRIPTION
        if args.calibration in ("default", "fashion-mnist")
        else Path(args.calibration).name
    )
    compressed.config.compression_provenance["calibration_processes"] = processes.count
    output = Path(args.output)
    # Only the main process tunes (its timings are the ones saved) and saves; a failure there is
    # reported on every process instead of leaving the others waiting.
    with processes.together("tuning and saving"):
        if processes.is_main:
            if examples is not None:
                from .tuning import tune

                tune(compressed, examples.to(next(compressed.parameters()).device))
            save_atomically(compressed.cpu(), output, (Path(model_path) / "preprocessor_config.json",))
    plan = compressed.compression_plan
    summary = {
        "output": str(output),
        "dense_parameters": plan.dense_parameters,
        "parameters": plan.parameters,
        "param_ratio": plan.param_ratio,
        "factorized_layers": len(plan.layers) - plan.shared_blocks,
        **({"shared_qkv_blocks": plan.shared_blocks} if plan.shared_blocks else {}),
        **({"merged_to_dense_by_tuning": len(plan.tuning["merged_to_dense"])} if plan.tuning else {}),
        # the factorization the default chose on the held-out images, and how long choosing took
        **({"chosen_factorization": plan.selection["chosen"]} if plan.selection else {}),
    }
    report = getattr(compressed, "compression_report", None)
    for stage in ("selection_seconds", "sequential_seconds"):  # what choosing and the block-by-block fit cost
        if getattr(report, stage, 0):
            summary[stage] = round(getattr(report, stage), 1)
    if processes.is_main:
        print(json.dumps(summary, indent=2))
    return summary


FASHION_MNIST_SIZES = {"train": 60_000, "test": 10_000}


def describe_data(spec: str, split: str, count: int) -> dict[str, str | None]:
    """How a DATA spec is named on model cards: display name, Hub dataset id and split.

    The Hub id (which puts results into the card's ``model-index``) is given only when the whole
    split was used: a subset's accuracy is not the split's accuracy.
    """
    if spec in ("default", "fashion-mnist"):
        if count == FASHION_MNIST_SIZES.get(split):
            return {"dataset": "Fashion-MNIST", "dataset_id": "zalando-datasets/fashion_mnist", "dataset_split": split}
        return {
            "dataset": f"Fashion-MNIST ({count:,} images of the {split} split)",
            "dataset_id": None,
            "dataset_split": split,
        }
    return {"dataset": Path(spec).name, "dataset_id": None, "dataset_split": split}


def has_separate_test_split(spec: str) -> bool:
    """Whether DATA holds a test split distinct from its training data (``default``, or a DatasetDict with 'test')."""
    if spec in ("default", "fashion-mnist"):
        return True
    return (Path(spec) / "dataset_dict.json").exists() and (Path(spec) / "test").is_dir()


def save_atomically(model, output: str | Path, extra_files: tuple[Path, ...] = ()) -> Path:
    """``save_pretrained`` into a staging sibling, then move into place: a failure leaves nothing half-written."""
    from .staging import staged_directory

    with staged_directory(output) as staging:
        model.save_pretrained(staging)
        for extra in extra_files:
            if extra.exists():
                shutil.copy(extra, staging / extra.name)
    return Path(output)


def measure_against_reference(
    args: argparse.Namespace, model, model_path: str, reference=None, source: str = "hf-vitcompress evaluate"
):
    """Evaluate ``model`` on the DATA test split next to its dense reference; returns ``(rows, report)``."""
    from .evaluation import dense_equivalent, evaluate_model

    batches = load_batches(args.data, model_path, "test", args.limit)
    compressed = bool(getattr(model.config, "compression_plan", None))
    reference_name = "dense"
    if reference is None:
        base = args.baseline or (getattr(model.config, "compression_provenance", None) or {}).get("base_model")
        from .hub import is_hub_id

        if base and (Path(base).exists() or is_hub_id(base) or args.baseline):
            reference = load_model(base)
        elif compressed and all(
            layer.kind in ("low_rank", "shared_input") for layer in model.compression_plan.layers.values()
        ):
            reference, reference_name = dense_equivalent(model), "dense (merged factors)"
    labelled = all("labels" in batch for batch in batches)
    return evaluate_model(
        model,
        batches if labelled else None,
        batches[0]["pixel_values"][: args.latency_batch_size],
        reference=reference,
        reference_name=reference_name,
        name="compressed" if compressed else "model",
        repeats=args.repeats,
        source=source,
        **describe_data(args.data, "test", sum(len(b["pixel_values"]) for b in batches)),
    )


def cmd_evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .evaluation import format_table

    model = load_model(args.model)
    rows, report = measure_against_reference(args, model, args.model)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.record:
        if not getattr(model.config, "compression_plan", None):
            raise ValueError("--record keeps the report with a compressed model for its card; this model is not one.")
        print(f"recorded in {report.save(args.model)} (the model card will show these numbers)")
    return rows


def _resolve_teacher(args: argparse.Namespace, recorded: str | None):
    """The dense teacher: ``--teacher`` or the recorded base model; None when no distillation is asked for."""
    from .hub import is_hub_id

    if args.alpha == 0 and args.feature_weight == 0:
        return None
    path = args.teacher or recorded
    if not path or not (Path(path).exists() or is_hub_id(path) or args.teacher):
        raise ValueError(
            "No teacher: the checkpoint does not record a dense model that exists here. Pass --teacher PATH_OR_ID, "
            "or --alpha 0 to fine-tune on labels only."
        )
    return load_model(path)


def _train_and_measure(args: argparse.Namespace, student, teacher, make_trainer, finish=None):
    """What ``finetune`` and ``prune`` share: data, held-out slice, checkpoints, training, test measurement, saving.

    ``make_trainer(**kwargs)`` builds the Trainer; ``finish(trainer)`` returns the model to measure and save
    (default: the trained student).
    """
    from . import metrics
    from .data import ExampleDataset
    from .evaluation import format_table
    from .training import CompressionCallback, DistillationArguments

    test_data = args.test_data or args.data
    if not has_separate_test_split(test_data) or (args.test_data is None and not has_separate_test_split(args.data)):
        raise ValueError(
            f"{args.data} has no separate test split, so the final measurement would reuse training images: pass "
            "--test-data DATA (held-out images), or a datasets folder with 'train' and 'test' splits."
        )
    output = Path(args.output)
    checkpoints = output.with_name(output.name + "-checkpoints")
    if any(checkpoints.glob("checkpoint-*")) and not args.resume:
        raise ValueError(
            f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it, or delete the folder."
        )
    pixels, labels = load_examples(args.data, args.model, "train", args.train_limit)
    if labels is None and args.alpha < 1:
        raise ValueError(f"{args.data} has no labels: use --alpha 1 to learn from the teacher alone.")
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(args.seed))
    held_out = min(args.validation_size, len(pixels) // 10)
    validation, train = order[:held_out], order[held_out:]

    def subset(index: torch.Tensor) -> ExampleDataset:
        return ExampleDataset(pixels[index], labels[index] if labels is not None else None)

    training_args = DistillationArguments(
        output_dir=str(checkpoints),
        alpha=args.alpha,
        temperature=args.temperature,
        kind=args.kind,
        feature_layers=args.feature_layers,
        feature_weight=args.feature_weight,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        eval_strategy="steps" if held_out and labels is not None else "no",
        eval_steps=args.save_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        seed=args.seed,
        report_to=args.report_to,
        disable_tqdm=args.quiet,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = make_trainer(
        model=student,
        teacher=teacher,
        args=training_args,
        train_dataset=subset(train),
        eval_dataset=subset(validation) if held_out else None,
        compute_metrics=metrics.top1_top5 if labels is not None else None,
        callbacks=[CompressionCallback(eval_dataset_name="a held-out slice of the training data")],
    )
    resume = args.resume and any(checkpoints.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    result = finish(trainer) if finish is not None else student
    result.eval()
    train_spec, args.data = args.data, test_data  # the final measurement reads the test split of test_data
    rows, _ = measure_against_reference(
        args, result, args.model, reference=teacher, source=f"hf-vitcompress {args.command}, after training"
    )
    print(format_table(rows))
    result.config.compression_provenance["finetuning"]["data"] = describe_data(train_spec, "train", len(train))[
        "dataset"
    ]
    save_atomically(result, output, (Path(args.model) / "preprocessor_config.json",))
    print(f"saved to {output} (checkpoints in {checkpoints})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def cmd_finetune(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Recover accuracy with distillation from the dense model, then measure on the test split and save."""
    from .training import DistillationTrainer

    student = load_model(args.model)
    if not getattr(student.config, "compression_plan", None):
        raise ValueError(f"{args.model} is not a compressed checkpoint; run `hf-vitcompress compress` first.")
    recorded = (getattr(student.config, "compression_provenance", None) or {}).get("base_model")
    teacher = _resolve_teacher(args, recorded)
    return _train_and_measure(args, student, teacher, DistillationTrainer)


def cmd_prune(args: argparse.Namespace) -> list[dict[str, Any]]:
    """UVC: learn which heads, value dims, neurons and blocks to remove under a FLOPs budget, with distillation;
    export the physically smaller model, measure it on the test split and save it."""
    from .methods.pruning.trainer import PruningTrainer

    args.model = args.model or str(DEFAULT_MODEL_DIR)
    config = _config_from_args(args)
    if config.method != "pruning":
        raise ValueError("hf-vitcompress prune runs method='pruning'; use `compress` / `finetune` for the others.")
    student = load_model(args.model)
    if getattr(student.config, "compression_plan", None):
        raise ValueError(f"{args.model} is already compressed; prune the original dense checkpoint.")
    teacher = _resolve_teacher(args, args.model)

    def make_trainer(**kwargs):
        return PruningTrainer(compression_config=config, **kwargs)

    return _train_and_measure(args, student, teacher, make_trainer, finish=lambda trainer: trainer.export())


def cmd_search_ranks(args: argparse.Namespace) -> dict[str, Any]:
    """Refine a head-factorized model's per-head ranks on held-out training images, then save it."""
    from .hub import is_hub_id
    from .methods.head_factorization.search import search_ranks

    model = load_model(args.model)
    layers = (getattr(model.config, "compression_plan", None) or {}).get("layers", {})
    if not any(layer.get("kind") == "head_factorized" for layer in layers.values()):
        raise ValueError(
            f"{args.model} was not compressed with --method head_factorization: there are no head ranks to search."
        )
    dense_path = args.dense or (getattr(model.config, "compression_provenance", None) or {}).get("base_model")
    if not dense_path or not (Path(dense_path).exists() or is_hub_id(dense_path) or args.dense):
        raise ValueError("No dense model: pass --dense PATH_OR_ID (the model that was compressed).")
    pixels, labels = load_examples(args.data, args.model, "train", None)
    if labels is None:
        raise ValueError(f"{args.data} has no labels: the rank search minimizes cross-entropy on labelled images.")
    # The *last* images of the training split: calibration uses the first ones, evaluation never these.
    pixels, labels = pixels[-args.search_images :], labels[-args.search_images :]
    batches = [
        {"pixel_values": pixels[i : i + args.batch_size], "labels": labels[i : i + args.batch_size]}
        for i in range(0, len(pixels), args.batch_size)
    ]
    calibration = None
    if args.calibration is not None:  # as `compress` read it: the same images give the same statistics
        samples = (getattr(model.config, "compression_config", None) or {}).get("calibration_samples")
        calibration = load_batches(args.calibration, args.model, "calibration", samples)
    searched = search_ranks(
        model,
        load_model(dense_path),
        batches,
        target_param_ratio=args.target_param_ratio,
        steps=args.steps,
        calibration_data=calibration,
        progress=not args.quiet,
    )
    searched.config.compression_provenance["rank_search"]["data"] = describe_data(args.data, "train", len(pixels))[
        "dataset"
    ]
    if calibration is not None:
        statistics = searched.config.compression_provenance["rank_search"]["attention_statistics"]
        statistics["data"] = describe_data(args.calibration, "calibration", statistics["images"])["dataset"]
    save_atomically(searched, args.output, (Path(args.model) / "preprocessor_config.json",))
    summary = {
        "output": args.output,
        "parameters": searched.compression_plan.parameters,
        "param_ratio": searched.compression_plan.param_ratio,
    }
    print(json.dumps(summary, indent=2))
    return summary


def cmd_card(args: argparse.Namespace) -> str:
    from .hub import build_model_card

    model = load_model(args.model, classifier=False)
    card = build_model_card(model, repo_id=args.repo_id, license=args.license)
    path = Path(args.output) if args.output else Path(args.model) / "README.md"
    card.save(path)
    print(f"model card written to {path}")
    return str(card)


def cmd_push(args: argparse.Namespace) -> str:
    model = load_model(args.model, classifier=False)
    commit = model.push_to_hub(
        args.repo_id,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        license=args.license,
        extra_files=[p for p in (Path(args.model) / "preprocessor_config.json",) if p.exists()],
    )
    print(f"pushed to {commit.commit_url}")
    return commit.commit_url


def fit_to_model(pixel_values: torch.Tensor, config: Any) -> torch.Tensor:
    """Images of another format made into the model's: channels repeated (grey to RGB) and resized to its
    ``image_size``. For checks of a graph against PyTorch on real images (``export``), not for accuracy."""
    from .calibration.data import image_config_of, image_size_of

    channels = getattr(image_config_of(config), "num_channels", pixel_values.shape[1])
    if pixel_values.shape[1] != channels:
        if pixel_values.shape[1] != 1:
            raise ValueError(f"The DATA images have {pixel_values.shape[1]} channels and the model takes {channels}.")
        pixel_values = pixel_values.expand(-1, channels, -1, -1)
    size = image_size_of(config)
    if tuple(pixel_values.shape[-2:]) != tuple(size):
        pixel_values = torch.nn.functional.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
    return pixel_values.contiguous()


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """Export to ONNX (``--format onnx``), checked against PyTorch on ``--data`` images with onnxruntime."""
    from .export import export_onnx, require_onnx

    require_onnx()
    model = load_model(args.model, "float32", classifier=False)
    pixels, _ = load_examples(args.data, args.model, "test", args.limit)
    fitted = fit_to_model(pixels, model.config)
    if fitted.shape[1:] != pixels.shape[1:]:
        print(f"note: validating on {args.data} images made {tuple(fitted.shape[1:])} (the model's input format)")
    report = export_onnx(
        model,
        args.output,
        fitted,
        dynamic_image_size=args.dynamic_image_size,
        int8=args.int8,
        opset=args.opset,
        tolerance=args.tolerance,
        source_dir=args.model if Path(args.model).is_dir() else None,
    )
    rows = [("fp32", report.onnx_file, report.validation)]
    if report.int8_file:
        rows.append(("int8", report.int8_file, report.int8_validation))
    print(f"{'graph':<6} {'file':<18} {'MB':>8} {'batch':>6} {'max |diff|':>11} {'relative':>9} {'top-1 same':>10}")
    for kind, name, validation in rows:
        for row in validation:
            agreement = f"{row['top1_agreement']:.1%}" if "top1_agreement" in row else "-"
            print(
                f"{kind:<6} {name:<18} {report.files[name] / 1e6:>8.2f} {row['batch']:>6} "
                f"{row['max_abs_diff']:>11.2e} {row['max_rel_diff']:>9.2e} {agreement:>10}"
            )
    print(f"written to {args.output} (outputs: {', '.join(report.outputs)}; report: onnx_export.json)")
    return {
        "output": args.output,
        "outputs": report.outputs,
        "max_rel_diff": report.max_rel_diff,
        "files": report.files,
    }


def cmd_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .compress import compress
    from .data import iterate_batches, load_fashion_mnist
    from .evaluation import evaluate_model, format_table

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
    compressed.config.compression_provenance["calibration_data"] = SHIPPED_CALIBRATION_DESCRIPTION
    rows, _ = evaluate_model(
        compressed,
        list(iterate_batches(test_images, test_labels, batch_size=500)),
        next(iterate_batches(test_images, batch_size=args.latency_batch_size))["pixel_values"],
        reference=dense,
        name=f"compressed ({config.method}, {config.target_flops_ratio or config.target_param_ratio:g})",
        repeats=args.repeats,
        source="hf-vitcompress demo",
        **describe_data("default", "test", len(test_images)),
    )
    print(format_table(rows))
    if args.output:
        save_atomically(compressed, args.output, (DEFAULT_MODEL_DIR / "preprocessor_config.json",))
        print(f"saved to {args.output}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _add_config_arguments(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    group = parser.add_argument_group("compression")
    group.add_argument("--method", choices=list(SUPPORTED_METHODS), default=None)
    group.add_argument("--target-param-ratio", dest="target_param_ratio", type=float, default=None)
    group.add_argument("--target-flops-ratio", dest="target_flops_ratio", type=float, default=None)
    group.add_argument("--skip-blocks", dest="skip_blocks", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--pruning-importance", dest="pruning_importance", choices=["magnitude", "taylor"], default=None)
    group.add_argument("--target-modules", dest="target_modules", nargs="+", default=None)
    group.add_argument("--calibration-samples", dest="calibration_samples", type=int, default=None)
    group.add_argument("--whitening", choices=list(WHITENING_CHOICES), default=None)
    group.add_argument("--loss-weighting", dest="loss_weighting", choices=list(LOSS_WEIGHTING_CHOICES), default=None)
    group.add_argument("--validation-interval", dest="validation_interval", type=int, default=None)
    group.add_argument("--sensitivity-samples", dest="sensitivity_samples", type=int, default=None)
    group.add_argument("--gram-shrinkage", dest="gram_shrinkage", type=float, default=None)
    group.add_argument("--rank-allocation", dest="rank_allocation", choices=list(ALLOCATION_CHOICES), default=None)
    group.add_argument(
        "--error-normalization", dest="error_normalization", choices=["relative", "absolute"], default=None
    )
    _add_true_false_auto(
        group,
        "--sequential",
        "fit block by block to the dense outputs (no value: true; 'auto': kept where the held-out error drops)",
    )
    group.add_argument("--no-sequential", dest="sequential", action="store_const", const=False)
    _add_true_false_auto(
        group,
        "--shared-qkv",
        "let allocation give q/k/v one shared down-projection per block (no value: true; 'auto': kept where "
        "the held-out error drops)",
    )
    group.add_argument("--compensation-rank", dest="compensation_rank", type=int, default=None)
    group.add_argument("--compensation-epochs", dest="compensation_epochs", type=int, default=None)
    if seed:  # commands that train have their own --seed, which the config then shares
        group.add_argument("--seed", type=int, default=None)


def _add_true_false_auto(group: argparse._ArgumentGroup, flag: str, help: str) -> None:
    """A config option that is True, False or 'auto' (the flag alone: True; absent: the config's default)."""
    group.add_argument(
        flag,
        dest=flag.removeprefix("--").replace("-", "_"),
        nargs="?",
        const=True,
        default=None,
        type=_true_false_auto,
        metavar="{true,false,auto}",
        help=help,
    )


def _true_false_auto(value: str) -> bool | str:
    choices = {"true": True, "false": False, "auto": "auto"}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}")
    return choices[value.lower()]


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-steps", dest="max_steps", type=int, default=300)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    parser.add_argument(
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=1e-4,
        help="peak learning rate (default 1e-4, chosen on the embedded Fashion-MNIST ViT; on the real DINOv2-S, "
        "100 distillation steps at 1e-4 wrecked the features and 2e-6 recovered them: README, 'Quality: measured')",
    )
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of distillation vs labels")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kind", choices=["soft", "hard"], default="soft")
    parser.add_argument("--feature-layers", dest="feature_layers", type=int, nargs="+", default=None)
    parser.add_argument("--feature-weight", dest="feature_weight", type=float, default=0.0)
    parser.add_argument("--train-limit", dest="train_limit", type=int, default=None)
    parser.add_argument("--validation-size", dest="validation_size", type=int, default=1000)
    parser.add_argument("--save-steps", dest="save_steps", type=int, default=100)
    parser.add_argument("--logging-steps", dest="logging_steps", type=int, default=25)
    parser.add_argument("--report-to", dest="report_to", nargs="*", default=[], help="Trainer loggers")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-data", dest="test_data", default=None, help="DATA measured at the end (test split)")
    parser.add_argument("--limit", type=int, default=None, help="measure on at most this many test images")
    parser.add_argument("--baseline", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-vitcompress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    compress_parser = sub.add_parser("compress", help="compress a ViT/DeiT checkpoint and save it")
    compress_parser.add_argument("--model", default=None, help="path or Hub id (default: the embedded default model)")
    compress_parser.add_argument("--calibration", default="default", help="calibration DATA (default: shipped images)")
    compress_parser.add_argument("--output", required=True)
    compress_parser.add_argument(
        "--device", default="cpu", help="device to calibrate (and --tune) on, e.g. cuda (default: cpu)"
    )
    compress_parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype to load and compress the model in; the output is saved in it (default: auto, the checkpoint's own)",
    )
    compress_parser.add_argument(
        "--tune",
        action="store_true",
        help="time dense / factorized / fused (GPU) per layer on --device and keep the fastest (recorded in the plan)",
    )
    compress_parser.add_argument(
        "--tune-batch-size", type=int, default=64, help="batch size the model will serve, for --tune (default 64)"
    )
    _add_config_arguments(compress_parser)

    evaluate_parser = sub.add_parser("evaluate", help="top-1, parameters, FLOPs and latency vs the dense model")
    evaluate_parser.add_argument("--model", required=True)
    evaluate_parser.add_argument("--data", default="default")
    evaluate_parser.add_argument(
        "--baseline", default=None, help="dense checkpoint to compare with (default: the recorded base model)"
    )
    evaluate_parser.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")

    evaluate_parser.add_argument(
        "--record", action="store_true", help="keep the report with the model (its model card shows these numbers)"
    )

    finetune_parser = sub.add_parser("finetune", help="recover accuracy by distillation from the dense model")
    finetune_parser.add_argument("--model", required=True, help="compressed checkpoint (student)")
    finetune_parser.add_argument("--teacher", default=None, help="dense model (default: the recorded base model)")
    finetune_parser.add_argument(
        "--data", default="default", help="training DATA; its test split is measured at the end"
    )
    finetune_parser.add_argument("--output", required=True)
    _add_training_arguments(finetune_parser)

    prune_parser = sub.add_parser(
        "prune", help="UVC: structured pruning + block skipping + distillation under a FLOPs budget"
    )
    prune_parser.add_argument("--model", default=None, help="dense checkpoint (default: the embedded default model)")
    prune_parser.add_argument("--teacher", default=None, help="dense teacher (default: the model itself, unpruned)")
    prune_parser.add_argument("--data", default="default", help="training DATA; its test split is measured at the end")
    prune_parser.add_argument("--output", required=True)
    _add_training_arguments(prune_parser)
    _add_config_arguments(prune_parser, seed=False)
    for name in ("warmup_ratio", "search_ratio", "count_lr", "dual_lr", "proximal_lr"):
        flag = "--pruning-" + name.replace("_", "-")
        prune_parser.add_argument(flag, dest=f"pruning_{name}", type=float, default=None)
    prune_parser.set_defaults(method="pruning")

    search_parser = sub.add_parser(
        "search-ranks",
        help="search per-head ranks of a head-factorized model",
        description="Search the per-head ranks of a model compressed with --method head_factorization on held-out "
        "training images, then save it. Every attention is re-factorized from the dense model (the compressed "
        "checkpoint keeps only truncated factors): on the statistics of --calibration when given (pass the DATA "
        "the model was compressed with to reproduce its factors), else of the first search images. Which one is "
        "recorded in the config's compression_provenance.rank_search.attention_statistics.",
    )
    search_parser.add_argument("--model", required=True, help="checkpoint compressed with --method head_factorization")
    search_parser.add_argument("--dense", default=None, help="the dense model (default: the recorded base model)")
    search_parser.add_argument("--data", default="default", help="training DATA (its last images are used)")
    search_parser.add_argument(
        "--calibration",
        default=None,
        help="DATA to re-factorize the attentions on (default: the first search images; pass the compression's "
        "calibration DATA to factorize on the statistics it used)",
    )
    search_parser.add_argument("--output", required=True)
    search_parser.add_argument("--steps", type=int, default=200)
    search_parser.add_argument("--search-images", dest="search_images", type=int, default=4096)
    search_parser.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    search_parser.add_argument("--target-param-ratio", dest="target_param_ratio", type=float, default=None)

    card_parser = sub.add_parser("card", help="write the model card of a compressed checkpoint")
    card_parser.add_argument("--model", required=True)
    card_parser.add_argument("--output", default=None, help="default: <model>/README.md")
    card_parser.add_argument("--repo-id", dest="repo_id", default=None, help="used in the card's loading snippet")
    card_parser.add_argument("--license", default=None)

    push_parser = sub.add_parser("push", help="upload a compressed checkpoint with its model card to the Hub")
    push_parser.add_argument("--model", required=True)
    push_parser.add_argument("--repo-id", dest="repo_id", required=True)
    push_parser.add_argument("--private", action="store_true", default=None)
    push_parser.add_argument("--token", default=None, help="default: the saved login or HF_TOKEN")
    push_parser.add_argument("--commit-message", dest="commit_message", default=None)
    push_parser.add_argument("--license", default=None)

    export_parser = sub.add_parser(
        "export",
        help="export to ONNX, checked against PyTorch with onnxruntime (and int8 with --int8)",
        description="Export the model's image path to ONNX (dynamic batch), check onnxruntime against PyTorch on "
        "DATA test images (max |difference| relative to the largest output, at batch 1 and --limit), and copy the "
        "config with its compression plan, the image processor and the model card along. Needs the [onnx] extra.",
    )
    export_parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (compressed or dense)")
    export_parser.add_argument("--format", choices=["onnx"], default="onnx")
    export_parser.add_argument("--output", required=True, help="new folder (or an earlier export) to write into")
    export_parser.add_argument("--data", default="default", help="DATA whose test images validate the graph")
    export_parser.add_argument("--limit", type=int, default=32, help="validation images (default 32)")
    export_parser.add_argument(
        "--int8", action="store_true", help="also write model_int8.onnx (onnxruntime dynamic int8 quantization)"
    )
    export_parser.add_argument(
        "--dynamic-image-size",
        dest="dynamic_image_size",
        action="store_true",
        help="height and width dynamic too (families that interpolate their position embeddings)",
    )
    export_parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    export_parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference allowed")

    demo_parser = sub.add_parser("demo", help="compress the embedded default model and print a before/after table")
    demo_parser.add_argument("--output", default=None, help="also save the compressed model here")
    demo_parser.add_argument("--limit", type=int, default=None, help="evaluate on at most this many test images")
    _add_config_arguments(demo_parser)

    for command in (evaluate_parser, demo_parser, finetune_parser, prune_parser):
        command.add_argument("--json", default=None, help="also write the table as JSON")
        command.add_argument("--repeats", type=int, default=20, help="latency repeats (median reported)")
        command.add_argument("--latency-batch-size", dest="latency_batch_size", type=int, default=32)
    for command in (
        compress_parser,
        evaluate_parser,
        demo_parser,
        finetune_parser,
        prune_parser,
        search_parser,
        card_parser,
        push_parser,
        export_parser,
    ):
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    handlers = {
        "compress": cmd_compress,
        "evaluate": cmd_evaluate,
        "finetune": cmd_finetune,
        "prune": cmd_prune,
        "search-ranks": cmd_search_ranks,
        "card": cmd_card,
        "push": cmd_push,
        "demo": cmd_demo,
        "export": cmd_export,
    }
    try:
        handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OnnxExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
