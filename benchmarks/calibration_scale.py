"""Calibration cost vs number of images for a ViT-B-shaped model on CPU: time grows, memory must not.

    python benchmarks/calibration_scale.py                     # 256..4096 images, 224 px
    python benchmarks/calibration_scale.py --counts 256 512 --image-size 112

Each count runs in a fresh process (peak resident memory is per process): build a ViT-B-shaped model
(random init, seeded; 768 wide, 12 blocks, MLP 3072), then run ``compress()`` in its statistics-only
mode (activation-aware whitening, one streaming pass, no compensation), which keeps one float64 Gram
matrix per target linear whatever the number of images. Reported: wall time of the whole ``compress()``
call, of its streaming calibration pass (forward passes + Gram updates) per image, of the rest
(factorization, installing the factors), and peak RSS minus the RSS before ``compress()``. Writes
``calibration_scale_<size>px.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, resident_memory_mb, update_results_file, vit_b


def worker(count: int, image_size: int, batch_size: int) -> dict:
    import torch

    from hf_vitcompress import CompressionConfig, compress

    model = vit_b(image_size)
    generator = torch.Generator().manual_seed(1)

    pass_time = {}

    def batches():  # generated on the fly: the data set itself is never held in memory
        pass_time["start"] = time.perf_counter()  # the calibration pass asks for the first batch
        for start in range(0, count, batch_size):
            yield torch.randn(min(batch_size, count - start), 3, image_size, image_size, generator=generator)
        pass_time["end"] = time.perf_counter()  # ... and finishes when the last one is consumed

    # one more than given, so the calibration pass asks for a batch after the last and the generator sees its end
    compression = CompressionConfig(
        target_param_ratio=0.5,
        whitening="gram",
        loss_weighting="none",
        rank_allocation="global",
        shared_qkv=False,  # as recorded (before the default shared q/k/v)
        calibration_samples=count + 1,
    )
    before = resident_memory_mb()
    start = time.perf_counter()
    compressed = compress(model, compression, batches(), progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    targets = len(compressed.config.compression_plan["layers"])
    gram_mb = (
        sum(
            m.in_features**2 * 8 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
        )
        / 2**20
    )
    return {
        "images": count,
        "image_size": image_size,
        "tokens": (image_size // 16) ** 2 + 1,
        "seconds": seconds,
        "pass_seconds": pass_time["end"] - pass_time["start"],
        "pass_seconds_per_image": (pass_time["end"] - pass_time["start"]) / count,
        "other_seconds": seconds - (pass_time["end"] - pass_time["start"]),
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "peak_minus_before_mb": peak - before,
        "gram_mb_all_linears": gram_mb,
        "factorized_layers": targets,
    }


def render(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        "## Calibration cost vs images (`python benchmarks/calibration_scale.py`)",
        "",
        f"ViT-B-shaped model (random init), {first['image_size']} px = {first['tokens']} tokens, CPU "
        "(2 cores), `compress()` statistics-only (whitening, no compensation), one fresh process per row. "
        f"The float64 Gram matrices of all block linears take {first['gram_mb_all_linears']:.0f} MB.",
        "",
        "| images | compress() s | calibration pass s | pass s / image | rest s | RSS before MB | peak RSS MB "
        "| peak − before MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['images']} | {row['seconds']:.1f} | {row['pass_seconds']:.1f} | {row['pass_seconds_per_image']:.3f} | "
            f"{row['other_seconds']:.1f} | {row['rss_before_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
            f"{row['peak_minus_before_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help="default: calibration_scale_<image size>px.json")
    parser.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.image_size, args.batch_size)))
        return
    rows = []
    for count in args.counts:
        command = [sys.executable, __file__, "--worker", str(count), "--image-size", str(args.image_size)]
        output = subprocess.run(
            [*command, "--batch-size", str(args.batch_size)], check=True, capture_output=True, text=True
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.output or HERE / f"calibration_scale_{args.image_size}px.json").write_text(json.dumps(rows, indent=2))
    table = render(rows)
    print(table)
    if not args.no_results:
        update_results_file(f"calibration-scale-{args.image_size}px", table)


if __name__ == "__main__":
    main()
