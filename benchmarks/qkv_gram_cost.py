"""What accumulating the shared q/k/v input Gram three times costs in the calibration pass (ViT-B shape, CPU).

``q_proj``, ``k_proj`` and ``v_proj`` read the same input, but the calibration pass (``record_linear_inputs``,
what ``compress()`` uses) keeps one float64 statistics entry per linear, so that input's Gram is built three
times. This times the streaming pass of the ViT-B-shaped model of ``calibration_scale.py`` (random init,
112 px = 50 tokens) over the same random images three ways, interleaved over several rounds:

* all 72 block linears recorded (what the activation-aware default does);
* ``k_proj`` and ``v_proj`` left out (48 linears: the q/k/v input recorded once);
* no statistics at all (forward passes only).

The first minus the second is the cost of the two redundant Gram updates.

    python benchmarks/qkv_gram_cost.py            # ~2 min on 2 idle CPU cores; writes JSON + RESULTS.md section
    python benchmarks/qkv_gram_cost.py --render   # only rebuild the RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import HERE, record_results, run_environment, vit_b

COMMAND = "python benchmarks/qkv_gram_cost.py"


def run(args) -> dict:
    import torch

    from hf_vitcompress.calibration.gram import collect_linear_statistics

    environment = run_environment()  # before timing: the load average says how busy the machine was
    model = vit_b(args.image_size)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        for _ in range(args.images // args.batch_size)
    ]
    blocks = len(model.vit.layers)
    every = [
        f"vit.layers.{b}.{path}"
        for b in range(blocks)
        for path in (
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "attention.o_proj",
            "mlp.fc1",
            "mlp.fc2",
        )
    ]
    variants = {
        "all 72 block linears": every,
        "without k_proj, v_proj (q/k/v input once)": [n for n in every if not n.endswith(("k_proj", "v_proj"))],
        "forward only, no statistics": [],
    }
    collect_linear_statistics(model, every, batches[:1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, names in variants.items():
            start = time.perf_counter()
            collect_linear_statistics(model, names, batches)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    full, once = medians["all 72 block linears"], medians["without k_proj, v_proj (q/k/v input once)"]
    return {
        "environment": environment,
        "image_size": args.image_size,
        "tokens": (args.image_size // 16) ** 2 + 1,
        "images": len(batches) * args.batch_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "seconds": times,
        "median_seconds": medians,
        "redundant_fraction_of_pass": (full - once) / full,
    }


def markdown(results: dict) -> str:
    medians = results["median_seconds"]
    return "\n".join(
        [
            "## Cost of the thrice-accumulated q/k/v Gram (`benchmarks/qkv_gram_cost.py`)",
            "",
            f"Command: `{COMMAND}` ({results['environment']['description']}). ViT-B-shaped model (random init), "
            f"{results['image_size']} px = {results['tokens']} tokens, one calibration pass "
            f"(`collect_linear_statistics`) over {results['images']} random images in batches of {results['batch_size']}; "
            f"median of {results['rounds']} interleaved rounds.",
            "",
            "| statistics recorded | pass s |",
            "|---|---|",
            *[f"| {name} | {value:.2f} |" for name, value in medians.items()],
            "",
            "The two redundant q/k/v Gram updates take "
            f"**{100 * results['redundant_fraction_of_pass']:.0f}%** of the full calibration pass here.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", dest="image_size", type=int, default=112)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(HERE / "qkv_gram_cost.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    record_results("qkv_gram_cost", args.json, args.render, lambda: run(args), markdown)


if __name__ == "__main__":
    main()
