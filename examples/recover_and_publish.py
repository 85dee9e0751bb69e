"""Compress the embedded default ViT, recover with distillation, measure, write the model card, (push).

    python examples/recover_and_publish.py --output runs/fmnist-vit-40            # ~2 min on 2 CPU cores
    python examples/recover_and_publish.py --output runs/fmnist-vit-40 --push your-name/fmnist-vit-40

Everything runs offline on the Fashion-MNIST data that installs with the package (the full training set
is used when ``apt-get install dataset-fashion-mnist`` put it in place). ``--push`` needs a token
(``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForImageClassification

import hf_vitcompress
from hf_vitcompress import (
    CompressionCallback,
    CompressionConfig,
    DistillationArguments,
    DistillationTrainer,
    build_model_card,
    compress,
    evaluate_model,
)
from hf_vitcompress.cli import describe_data, load_examples
from hf_vitcompress.data import (
    DEFAULT_MODEL_DIR,
    ExampleDataset,
    iterate_batches,
    load_fashion_mnist,
)
from hf_vitcompress.evaluation import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kind", choices=["soft", "hard"], default="soft")
    parser.add_argument("--push", metavar="REPO_ID", default=None)
    args = parser.parse_args()
    output = Path(args.output)

    # 1. compress the dense default with 512 calibration images
    dense = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR).eval()
    calibration, _ = load_fashion_mnist("calibration")
    small = compress(
        dense, CompressionConfig(target_param_ratio=args.ratio), list(iterate_batches(calibration, batch_size=64))
    )
    small.config.compression_provenance["calibration_data"] = (
        "Fashion-MNIST training images shipped with hf_vitcompress"
    )

    # 2. recover: distillation from the dense model, the student's size and cost logged as it trains
    pixels, labels = load_examples("default", str(DEFAULT_MODEL_DIR), "train", limit=20_000)
    train, validation = ExampleDataset(pixels[:-1000], labels[:-1000]), ExampleDataset(pixels[-1000:], labels[-1000:])
    trainer = DistillationTrainer(
        model=small,
        teacher=dense,
        args=DistillationArguments(
            output_dir=str(output.with_name(output.name + "-checkpoints")),
            alpha=0.5,
            temperature=1.0,
            kind=args.kind,
            max_steps=args.steps,
            per_device_train_batch_size=64,
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            eval_strategy="steps",
            eval_steps=max(args.steps // 2, 1),
            save_strategy="no",
            logging_steps=max(args.steps // 4, 1),
            report_to=[],
        ),
        train_dataset=train,
        eval_dataset=validation,
        compute_metrics=hf_vitcompress.metrics.top1,
        callbacks=[CompressionCallback()],
    )
    trainer.train()

    # 3. measure on the test split, next to the dense model, and keep the report with the model
    test_images, test_labels = load_fashion_mnist("test")
    rows, _ = evaluate_model(
        small.eval(),
        list(iterate_batches(test_images, test_labels, batch_size=500)),
        next(iterate_batches(test_images, batch_size=32))["pixel_values"],
        reference=dense,
        source="examples/recover_and_publish.py",
        **describe_data("default", "test", len(test_images)),  # names a subset as a subset
    )
    print(format_table(rows))

    # 4. save (weights, config with the plan, loader shim, evaluation report) and write the card
    small.save_pretrained(output)
    card = build_model_card(small, repo_id=args.push, license="apache-2.0")
    card.save(output / "README.md")
    print(f"saved to {output}; model card: {output / 'README.md'}")
    if args.push:
        commit = small.push_to_hub(args.push, license="apache-2.0")
        print(f"pushed: {commit.commit_url}")


if __name__ == "__main__":
    main()
