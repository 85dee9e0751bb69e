"""Head low-rank (COMCAT) adapter vs PEFT LoRA for customizing a text-to-image UNet, on the tiny offline pipeline.

    python benchmarks/diffusion_adapter.py            # ~3 minutes on 2 CPU cores
    python benchmarks/diffusion_adapter.py --steps 400 --learning-rates 1e-4 1e-3 1e-2

Same pipeline (``hf_vitcompress.adapters.tiny``: a Stable-Diffusion-1.x-shaped UNet with random
weights), same concept images (6 Fashion-MNIST sneakers), same prompt, same seeds. Methods:

* ``head low-rank``: COMCAT's branch, rank 2 per head, in every self- and cross-attention;
* ``LoRA, same rank``: PEFT LoRA of rank 2 on ``to_q``/``to_k``/``to_v``/``to_out.0`` of the same attentions;
* ``LoRA, same parameters``: LoRA with the rank whose trainable-parameter count is closest to the adapter's;
* ``LoRA, same total width``: LoRA of rank heads × 2 (the adapter's extra width per attention, summed over heads).

Each method runs in a fresh process (its peak resident memory is its own) and is trained once per
learning rate for ``--steps`` steps (AdamW, batch 1). Reported: trainable parameters, the size of the
file each saves (``save_head_lowrank_adapter`` / ``save_lora_weights``), the median training-step time,
peak RSS growth during training, and the denoising loss on a fixed set (the concept latents at fixed
noise and timesteps) before and after training, best over the learning rates (each method gets its own
best learning rate). The tiny UNet's attention is a small part of its compute, so step times say
little about a real Stable Diffusion; the parameter and file-size ratios carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import HERE, resident_memory_mb, update_results_file

METHODS = ("head low-rank", "LoRA, same rank", "LoRA, same parameters", "LoRA, same total width")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _setup(seed: int):
    import torch

    from hf_vitcompress.adapters.tiny import IMAGE_SIZE, tiny_pipeline
    from hf_vitcompress.adapters.training import FixedDenoisingSet, encode_images, load_concept_images

    sys.path.insert(0, str(HERE.parent / "examples"))
    from customize_diffusion import write_default_concept

    pipe = tiny_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        write_default_concept(Path(folder))
        images = load_concept_images(folder, IMAGE_SIZE)
    latents = encode_images(pipe, images, torch.Generator().manual_seed(seed))
    fixed = FixedDenoisingSet.build(pipe, latents, repeats=4, seed=seed + 1)
    return pipe, latents, fixed


def _lora_parameters(rank: int) -> int:
    from peft import LoraConfig

    from hf_vitcompress.adapters.tiny import tiny_unet

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def _add(method: str, unet, lora_rank: int):
    from peft import LoraConfig

    from hf_vitcompress.adapters import HeadLowRankAdapterConfig, add_head_lowrank_adapter

    if method == "head low-rank":
        add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(rank_per_head=2, targets=("attn1", "attn2")), "concept")
    else:
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS), "concept")


def _save(method: str, pipe, folder: Path) -> int:
    if method == "head low-rank":
        from hf_vitcompress.adapters import save_head_lowrank_adapter

        save_head_lowrank_adapter(pipe.unet, folder, "concept")
    else:
        from peft.utils import get_peft_model_state_dict

        type(pipe).save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="concept")
        )
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def worker(method: str, lora_rank: int, steps: int, learning_rates: list[float], prompt: str, seed: int) -> dict:
    import torch

    from hf_vitcompress.adapters.training import prompt_ids, train_customization

    torch.manual_seed(seed)
    pipe, latents, fixed = _setup(seed)
    with torch.no_grad():
        context = pipe.text_encoder(prompt_ids(pipe, prompt))[0]
    initial = pristine = None
    runs = []
    before = resident_memory_mb()
    for learning_rate in learning_rates:
        if pristine is None:
            pristine = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        else:
            pipe.unet = type(pipe.unet).from_config(pipe.unet.config)  # a fresh UNet with the pristine weights
            pipe.unet.load_state_dict(pristine)
            pipe.unet.requires_grad_(False)
        torch.manual_seed(seed)  # the adapters' random factors start the same for every learning rate
        _add(method, pipe.unet, lora_rank)
        parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
        if initial is None:
            initial = fixed.loss(pipe, context)
        record = train_customization(
            pipe, latents, prompt, parameters, steps=steps, learning_rate=learning_rate, batch_size=1, seed=seed
        )
        runs.append(
            {
                "learning_rate": learning_rate,
                "loss": fixed.loss(pipe, context),
                "ms_per_step": record.seconds_per_step * 1e3,
            }
        )
    with tempfile.TemporaryDirectory() as folder:
        file_bytes = _save(method, pipe, Path(folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = min(runs, key=lambda run: run["loss"])
    return {
        "method": method,
        "lora_rank": lora_rank if method != "head low-rank" else None,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "file_bytes": file_bytes,
        "ms_per_step": sorted(run["ms_per_step"] for run in runs)[len(runs) // 2],
        "peak_rss_growth_mb": peak - before,
        "initial_loss": initial,
        "best_loss": best["loss"],
        "best_learning_rate": best["learning_rate"],
        "runs": runs,
    }


def render(rows: list[dict], steps: int, learning_rates: list[float]) -> str:
    adapter = rows[0]
    lines = [
        "## Diffusion customization: head low-rank adapter vs LoRA (`python benchmarks/diffusion_adapter.py`)",
        "",
        f"Tiny Stable-Diffusion-shaped pipeline (random weights, 8 attentions, 32 px), 6 concept images, {steps} "
        f"AdamW steps at batch 1 per learning rate in {learning_rates}, CPU ({os.cpu_count()} cores), one fresh process per method. "
        "Fixed-set loss: denoising MSE on the concept latents at fixed noise and timesteps (lower fits better), "
        "before training and after the best learning rate. Ratios are against the head low-rank adapter.",
        "",
        "| method | trainable params | saved file | ms / step | peak RSS growth MB | fixed-set loss before → after | best lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = row["method"] + (f" (r={row['lora_rank']})" if row["lora_rank"] else " (2 per head)")
        lines.append(
            f"| {name} | {row['trainable_parameters']:,} ({row['trainable_parameters'] / adapter['trainable_parameters']:.2f}x) "
            f"| {row['file_bytes'] / 1024:.1f} KiB ({row['file_bytes'] / adapter['file_bytes']:.2f}x) "
            f"| {row['ms_per_step']:.1f} ({row['ms_per_step'] / adapter['ms_per_step']:.2f}x) "
            f"| {row['peak_rss_growth_mb']:.0f} | {row['initial_loss']:.4f} → {row['best_loss']:.4f} | {row['best_learning_rate']:g} |"
        )
    lines += ["", "Every learning rate (fixed-set loss after training):", ""]
    lines.append("| method | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " |")
    lines.append("|---|" + "---|" * len(learning_rates))
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(f"{run['loss']:.4f}" for run in row["runs"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--prompt", default="a photo of sneaker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lora-rank", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    if args.worker is not None:
        row = worker(args.worker, args.lora_rank, args.steps, args.learning_rates, args.prompt, args.seed)
        print(json.dumps(row))
        return

    from hf_vitcompress.adapters import HeadLowRankAdapterConfig, add_head_lowrank_adapter
    from hf_vitcompress.adapters.tiny import tiny_unet

    unet = tiny_unet()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(rank_per_head=2))
    adapter_parameters = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    matched = min(range(1, 33), key=lambda rank: abs(_lora_parameters(rank) - adapter_parameters))
    rows = []
    heads = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    for method, rank in zip(METHODS, (2, 2, matched, 2 * heads)):
        command = [sys.executable, __file__, "--worker", method, "--lora-rank", str(rank), "--steps", str(args.steps)]
        command += [
            "--learning-rates",
            *map(str, args.learning_rates),
            "--prompt",
            args.prompt,
            "--seed",
            str(args.seed),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    (HERE / "diffusion_adapter.json").write_text(json.dumps(rows, indent=2))
    table = render(rows, args.steps, args.learning_rates)
    print(table)
    if not args.no_results:
        update_results_file("diffusion-adapter", table)


if __name__ == "__main__":
    main()
