"""Compress a ViT/DeiT with the Python API, save it, load it back, compare.

    python examples/compress_vit.py                                # the embedded default model, offline
    python examples/compress_vit.py --model google/vit-base-patch16-224 --images path/to/imagefolder

With ``--model`` a Hub id or a local checkpoint folder is loaded through the ordinary transformers code
path; ``--images`` is a folder of images (sub-folders per class) used for calibration.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_vitcompress
from hf_vitcompress import CompressionConfig, compress
from hf_vitcompress.cli import DEFAULT_MODEL_DIR
from hf_vitcompress.data import iterate_batches, load_fashion_mnist


def calibration_batches(model_id: str, images: str | None):
    if images is None:
        calibration_images, _ = load_fashion_mnist("calibration")
        return list(iterate_batches(calibration_images, batch_size=64))
    import datasets

    processor = AutoImageProcessor.from_pretrained(model_id)
    dataset = datasets.load_dataset("imagefolder", data_dir=images, split="train")
    dataset = dataset.with_transform(
        lambda batch: processor([im.convert("RGB") for im in batch["image"]], return_tensors="pt")
    )
    return torch.utils.data.DataLoader(dataset, batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--images", default=None)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    config = CompressionConfig(method="activation_aware", target_param_ratio=args.ratio)
    small = compress(model, config, calibration_data=calibration_batches(args.model, args.images))
    plan = small.compression_plan
    print(
        f"{plan.dense_parameters:,} -> {plan.parameters:,} parameters (ratio {plan.param_ratio:.4f}), {len(plan.layers)} linears factorized"
    )

    with tempfile.TemporaryDirectory() as out:
        small.save_pretrained(out)
        again = AutoModelForImageClassification.from_pretrained(out)  # works because hf_vitcompress is imported
        pixels = torch.randn(2, model.config.num_channels, *([model.config.image_size] * 2))
        same = torch.equal(small(pixel_values=pixels).logits, again(pixel_values=pixels).logits)
        print(
            f"reloaded as {type(again).__name__} (hf_vitcompress {hf_vitcompress.__version__}); identical logits: {same}"
        )


if __name__ == "__main__":
    main()
