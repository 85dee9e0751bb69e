"""Compress the embedded default, export it to ONNX with its int8 form, and serve it with onnxruntime.

    pip install 'hf_vitcompress[onnx]'
    python examples/export_onnx.py [--output out-onnx]

Prints the export's parity check and the top-1 of PyTorch, the fp32 graph and the int8 graph on the shipped
Fashion-MNIST test images: what a deployment needs to know before it swaps the model in.
"""

from __future__ import annotations

import argparse

import onnxruntime
import torch
from transformers import AutoModelForImageClassification

from hf_vitcompress import CompressionConfig, compress, export_onnx
from hf_vitcompress.data import DEFAULT_MODEL_DIR, iterate_batches, load_fashion_mnist, to_pixel_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out-onnx")
    args = parser.parse_args()

    dense = AutoModelForImageClassification.from_pretrained(DEFAULT_MODEL_DIR).eval()
    calibration, _ = load_fashion_mnist("calibration")
    model = compress(
        dense, CompressionConfig(target_param_ratio=0.5), list(iterate_batches(calibration, batch_size=64))
    )

    images, labels = load_fashion_mnist("test")
    pixels, labels = to_pixel_values(images), torch.from_numpy(labels)
    report = export_onnx(model, args.output, pixels[:32], int8=True, source_dir=DEFAULT_MODEL_DIR)
    print(f"exported to {args.output}: {report.files} (largest relative difference {report.max_rel_diff:.1e})")

    with torch.no_grad():
        predictions = {"PyTorch": torch.cat([model(pixel_values=x).logits.argmax(-1) for x in pixels.split(500)])}
    for name in (report.onnx_file, report.int8_file):
        session = onnxruntime.InferenceSession(f"{args.output}/{name}", providers=["CPUExecutionProvider"])
        logits = [session.run(None, {"pixel_values": x.numpy()})[0] for x in pixels.split(500)]
        predictions[name] = torch.cat([torch.from_numpy(chunk).argmax(-1) for chunk in logits])
    for name, predicted in predictions.items():
        print(f"{name:>16}: top-1 {(predicted == labels).float().mean().item():.2%} on {len(labels):,} test images")


if __name__ == "__main__":
    main()
