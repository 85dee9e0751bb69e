"""Multi-process calibration gives the single-process result: the README's ``accelerate launch`` command, measured.

Compresses the embedded default with the default config twice through the command line, once in one
process (``hf-vitcompress compress``) and once as two CPU processes over gloo (the README's
``accelerate launch --multi_gpu --num_processes 2 ... -m hf_vitcompress.cli compress``), then loads both
checkpoints and compares their plans (every layer's rank) and their logits on the test images.

    python benchmarks/distributed_equivalence.py            # ~3 min on 2 idle CPU cores
    python benchmarks/distributed_equivalence.py --render   # only rebuild the RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, record_results, run_environment

COMMAND = "python benchmarks/distributed_equivalence.py"
RATIO = "0.5"
SINGLE = ["-m", "hf_vitcompress.cli", "compress", "--target-param-ratio", RATIO, "--quiet", "--output"]
LAUNCH = [
    "-m",
    "accelerate.commands.launch",  # what the `accelerate launch` executable runs
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "hf_vitcompress.cli",
    "compress",
    "--target-param-ratio",
    RATIO,
    "--quiet",
    "--output",
]


def timed(arguments: list[str]) -> float:
    start = time.perf_counter()
    finished = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env={**os.environ})
    if finished.returncode != 0:
        sys.stderr.write(finished.stdout + finished.stderr)
        raise SystemExit(f"`{' '.join(arguments)}` failed with exit status {finished.returncode}")
    return time.perf_counter() - start


def run() -> dict:
    import torch

    import hf_vitcompress  # noqa: F401  (registers the compressed classes)
    from hf_vitcompress.cli import load_model
    from hf_vitcompress.data import iterate_batches, load_fashion_mnist

    environment = run_environment()  # before the runs
    with tempfile.TemporaryDirectory() as folder:
        single, multi = str(Path(folder) / "single"), str(Path(folder) / "multi")
        seconds = {"one process": timed([*SINGLE, single]), "accelerate launch, 2 processes": timed([*LAUNCH, multi])}
        a, b = load_model(single).eval(), load_model(multi).eval()
        ranks = {name: layer for name, layer in a.config.compression_plan["layers"].items()}
        same_plan = ranks == b.config.compression_plan["layers"]
        images, labels = load_fashion_mnist("test")
        with torch.no_grad():
            la = torch.cat([a(pixel_values=x["pixel_values"]).logits for x in iterate_batches(images, batch_size=500)])
            lb = torch.cat([b(pixel_values=x["pixel_values"]).logits for x in iterate_batches(images, batch_size=500)])
    return {
        "environment": environment,
        "target_param_ratio": float(RATIO),
        "test_images": len(images),
        "seconds": seconds,
        "same_plan": same_plan,
        "relative_logit_difference": float((la - lb).norm() / la.norm()),
        "max_abs_logit_difference": float((la - lb).abs().max()),
        "same_top1_predictions": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
    }


def markdown(results: dict) -> str:
    return "\n".join(
        [
            "## One process vs `accelerate launch` with two (`benchmarks/distributed_equivalence.py`)",
            "",
            f"Command: `{COMMAND}` ({results['environment']['description']}). The embedded default compressed with "
            f"the default config at ratio {results['target_param_ratio']} by `python -m hf_vitcompress.cli compress` "
            "in one process and by `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
            "--mixed_precision no --dynamo_backend no -m hf_vitcompress.cli compress` (two CPU processes, gloo); both "
            f"checkpoints reloaded and run on {results['test_images']:,} Fashion-MNIST test images.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| same plan (every layer's rank) | {'yes' if results['same_plan'] else '**no**'} |",
            f"| relative logit difference ‖Δ‖/‖logits‖ | {results['relative_logit_difference']:.1e} |",
            f"| largest absolute logit difference | {results['max_abs_logit_difference']:.1e} |",
            f"| same top-1 prediction | {100 * results['same_top1_predictions']:.2f}% of images |",
            *[f"| wall s, {name} | {value:.0f} |" for name, value in results["seconds"].items()],
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(HERE / "distributed_equivalence.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    record_results("distributed_equivalence", args.json, args.render, lambda: run(), markdown)


if __name__ == "__main__":
    main()
