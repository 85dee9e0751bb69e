"""Why ``HeadFactorizedAttention`` zero-pads q, k and v to one head width under SDPA: time both on CPU.

``torch.nn.functional.scaled_dot_product_attention`` with query/key heads of width 32 and value heads of
width 26 (what a head-factorized or pruned attention can have) against the same call with the values
zero-padded to width 32 and the output sliced back to 26 (what the module does). Batch 64, 50 tokens,
4 heads, float32, the original ``head_dim ** -0.5`` scale; medians of interleaved calls. The two outputs
are also compared (the padding must not change the result).

    python benchmarks/sdpa_padding.py            # ~10 s; writes benchmarks/sdpa_padding.json + RESULTS.md section
    python benchmarks/sdpa_padding.py --render   # only rebuild the RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import HERE, record_results, run_environment

COMMAND = "python benchmarks/sdpa_padding.py"


def run(args) -> dict:
    environment = run_environment()  # before timing: the load average says how busy the machine was
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.tokens)
    query, key = torch.randn(*shape, args.qk_width), torch.randn(*shape, args.qk_width)
    value = torch.randn(*shape, args.v_width)
    scale = args.qk_width**-0.5

    def unequal():
        return F.scaled_dot_product_attention(query, key, value, scale=scale)

    def padded():
        width = max(args.qk_width, args.v_width)
        q, k = (F.pad(t, (0, width - args.qk_width)) for t in (query, key))
        v = F.pad(value, (0, width - args.v_width))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., : args.v_width]

    with torch.inference_mode():
        difference = float((unequal() - padded()).abs().max())
        times = {"unequal widths (fallback)": [], "padded to one width": []}
        for _ in range(args.warmup):
            unequal(), padded()
        for _ in range(args.repeats):
            for name, function in (("unequal widths (fallback)", unequal), ("padded to one width", padded)):
                start = time.perf_counter()
                function()
                times[name].append(1000 * (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "environment": environment,
        "shape": {
            "batch": args.batch,
            "heads": args.heads,
            "tokens": args.tokens,
            "qk_width": args.qk_width,
            "v_width": args.v_width,
        },
        "repeats": args.repeats,
        "median_ms": medians,
        "slowdown_of_fallback": medians["unequal widths (fallback)"] / medians["padded to one width"],
        "max_abs_difference": difference,
    }


def markdown(results: dict) -> str:
    shape, medians = results["shape"], results["median_ms"]
    lines = [
        "## SDPA with unequal head widths vs padded (`benchmarks/sdpa_padding.py`)",
        "",
        f"Command: `{COMMAND}` ({results['environment']['description']}). "
        f"`scaled_dot_product_attention` on batch {shape['batch']} × {shape['tokens']} tokens, {shape['heads']} heads, "
        f"query/key width {shape['qk_width']}, value width {shape['v_width']}, float32; median of {results['repeats']} "
        "interleaved calls each.",
        "",
        "| call | median ms |",
        "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in medians.items()],
        "",
        f"The unequal-width call took **{results['slowdown_of_fallback']:.1f}x** the time of the padded one; "
        f"the two outputs differ by at most {results['max_abs_difference']:.1e}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--qk-width", dest="qk_width", type=int, default=32)
    parser.add_argument("--v-width", dest="v_width", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=str(HERE / "sdpa_padding.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    record_results("sdpa_padding", args.json, args.render, lambda: run(args), markdown)


if __name__ == "__main__":
    main()
