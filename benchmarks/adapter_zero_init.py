"""How much adding a zero-initialized head low-rank adapter changes a UNet's output (it should be rounding only).

The tiny Stable-Diffusion-shaped UNet (``hf_vitcompress.adapters.tiny.tiny_unet``, random weights, 8
attentions), float32, CPU: the output on random latents, timesteps and text states before and after
``add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig())`` (rank 2 per head on ``attn1`` and ``attn2``;
one factor of each product is zero, so the branch adds exact zeros and only the wider SDPA call rounds
differently), and after disabling the adapters again (the original processors: must be bit-identical).

    python benchmarks/adapter_zero_init.py            # ~10 s; writes benchmarks/adapter_zero_init.json + RESULTS.md section
    python benchmarks/adapter_zero_init.py --render   # only rebuild the RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse

import torch
from _common import HERE, record_results, run_environment

COMMAND = "python benchmarks/adapter_zero_init.py"


def run(args) -> dict:
    from hf_vitcompress.adapters import (
        HeadLowRankAdapterConfig,
        add_head_lowrank_adapter,
        disable_head_lowrank_adapters,
    )
    from hf_vitcompress.adapters.tiny import tiny_unet

    environment = run_environment()
    rows = []
    for seed in args.seeds:
        unet = tiny_unet().eval()
        generator = torch.Generator().manual_seed(seed)
        inputs = (
            torch.randn(2, 4, 16, 16, generator=generator),
            torch.tensor([10, 500]),
            torch.randn(2, 7, 32, generator=generator),
        )
        with torch.no_grad():
            before = unet(*inputs).sample
            add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig())
            added = unet(*inputs).sample
            disable_head_lowrank_adapters(unet)
            disabled = unet(*inputs).sample
        rows.append(
            {
                "seed": seed,
                "max_abs_change_added": float((added - before).abs().max()),
                "relative_change_added": float((added - before).norm() / before.norm()),
                "max_abs_output": float(before.abs().max()),
                "max_abs_change_disabled": float((disabled - before).abs().max()),
            }
        )
    parameters = sum(p.numel() for p in tiny_unet().parameters())
    return {"environment": environment, "unet_parameters": parameters, "rows": rows}


def markdown(results: dict) -> str:
    rows = results["rows"]
    return "\n".join(
        [
            "## Adding a zero-initialized head low-rank adapter (`benchmarks/adapter_zero_init.py`)",
            "",
            f"Command: `{COMMAND}` ({results['environment']['description']}). The tiny random-weight UNet "
            f"(`hf_vitcompress.adapters.tiny.tiny_unet`, {results['unet_parameters']:,} parameters, 8 attentions), float32, batch 2 of random 16×16 latents; "
            "output before and after `add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig())`, and after "
            "`disable_head_lowrank_adapters(unet)`.",
            "",
            "| input seed | largest change after adding | ‖Δ‖/‖output‖ after adding | largest output magnitude | largest change after disabling |",
            "|---|---|---|---|---|",
            *[
                f"| {r['seed']} | {r['max_abs_change_added']:.1e} | {r['relative_change_added']:.1e} | "
                f"{r['max_abs_output']:.2f} | {r['max_abs_change_disabled']:.1e} |"
                for r in rows
            ],
            "",
            f"Largest change after adding, over all seeds: **{max(r['max_abs_change_added'] for r in rows):.1e}**; "
            f"after disabling: **{max(r['max_abs_change_disabled'] for r in rows):.1e}**.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default=str(HERE / "adapter_zero_init.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    record_results("adapter_zero_init", args.json, args.render, lambda: run(args), markdown)


if __name__ == "__main__":
    main()
