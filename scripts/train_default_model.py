"""Train the small ViT that ships with hf_vitcompress as its embedded default.

The model is an ordinary ``ViTForImageClassification`` (28×28 grayscale, patch 4 → 49 tokens + CLS,
width 128, 6 layers, 4 heads, MLP 512), trained from scratch on the Fashion-MNIST training set
(MIT license, Zalando; installed offline by Debian's ``dataset-fashion-mnist``). It also writes the
shipped data subset: 1,024 training images (calibration) and 2,000 test images (demo evaluation).

    python scripts/train_default_model.py --epochs 12          # ~25 min on 2 CPU cores

Everything is seeded; the output goes to ``hf_vitcompress/default/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_vitcompress.data import (
    DEFAULT_DIR,
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    SUBSET_PATH,
    find_fashion_mnist,
    load_fashion_mnist,
    to_pixel_values,
)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and ±2 px translation (zero padding): cheap, label-preserving."""
    n = pixels.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    padded = F.pad(pixels, (2, 2, 2, 2), value=float(-FASHION_MNIST_MEAN / FASHION_MNIST_STD))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 500):
        logits = model(pixel_values=to_pixel_values(images[start : start + 500])).logits
        correct += (logits.argmax(-1).numpy() == labels[start : start + 500]).sum()
    return float(correct) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--output", default=str(DEFAULT_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    root = find_fashion_mnist(args.data)
    if root is None:
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or pass --data.")
    train_x, train_y = load_fashion_mnist("train", root)
    test_x, test_y = load_fashion_mnist("test", root)

    config = ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
        num_labels=10,
        id2label=dict(enumerate(FASHION_MNIST_LABELS)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_LABELS)},
    )
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    warmup = steps_per_epoch // 2

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup)))

    step = 0
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        running = 0.0
        for i in range(steps_per_epoch):
            index = order[i * args.batch_size : (i + 1) * args.batch_size]
            pixels = augment(to_pixel_values(train_x[index]), generator)
            labels = torch.from_numpy(train_y[index])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(pixel_values=pixels).logits, labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item()
            step += 1
        acc = accuracy(model, test_x, test_y)
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {running / steps_per_epoch:.4f} "
            f"test top-1 {acc:.4f} ({time.time() - start:.0f} s)",
            flush=True,
        )

    output = Path(args.output)
    model_dir = output / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    ViTImageProcessor(
        do_resize=False,
        image_mean=[FASHION_MNIST_MEAN],
        image_std=[FASHION_MNIST_STD],
        size={"height": 28, "width": 28},
    ).save_pretrained(model_dir)

    calibration = np.sort(rng.choice(len(train_x), 1024, replace=False))
    test_subset = np.sort(rng.choice(len(test_x), 2000, replace=False))
    np.savez_compressed(
        SUBSET_PATH if output == DEFAULT_DIR else output / SUBSET_PATH.name,
        calibration_images=train_x[calibration],
        calibration_labels=train_y[calibration].astype(np.uint8),
        test_images=test_x[test_subset],
        test_labels=test_y[test_subset].astype(np.uint8),
    )
    summary = {
        "epochs": args.epochs,
        "test_top1_full": accuracy(model, test_x, test_y),
        "test_top1_subset": accuracy(model, test_x[test_subset], test_y[test_subset]),
        "train_seconds": round(time.time() - start, 1),
        "seed": args.seed,
    }
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
