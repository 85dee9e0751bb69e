"""Teach a text-to-image model a concept with a COMCAT head low-rank adapter (DreamBooth / Custom Diffusion style).

    python examples/customize_diffusion.py                      # offline: tiny random pipeline, Fashion-MNIST sneakers
    python examples/customize_diffusion.py --pretrained path/to/stable-diffusion-v1-5 \\
        --images my_dog/ --prompt "a photo of <v> dog" --initializer-token dog --device cuda

A few images of the concept and a prompt with a placeholder token (``<v>``) are enough. The UNet stays
frozen; a rank-``r``-per-head branch is trained in every self- and cross-attention (COMCAT: rank 2,
lr 2.5e-3, 500 steps, batch 1), together with the placeholder's token embedding. The output folder
holds the adapter (``head_lowrank_adapter.safetensors`` + its JSON config), the token embedding
(``placeholder_token.safetensors``) and a few generated samples. To use them on the same base model::

    load_head_lowrank_adapter(pipe.unet, "customized/")
    load_placeholder_token(pipe, "customized/")   # from hf_vitcompress.adapters.training
    pipe("a photo of <v> sneaker on the beach")

Without ``--pretrained`` (no Hub here) the pipeline is a tiny Stable-Diffusion-shaped one with random
weights and the concept is the Fashion-MNIST sneakers shipped with hf_vitcompress: every code path is the
real one, the pictures mean nothing. ``--pretrained`` takes a local diffusers folder (or, where the Hub
is reachable, a model id).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from hf_vitcompress.adapters import HeadLowRankAdapterConfig, add_head_lowrank_adapter, save_head_lowrank_adapter
from hf_vitcompress.adapters.tiny import IMAGE_SIZE, tiny_pipeline
from hf_vitcompress.adapters.training import (
    add_placeholder_token,
    encode_images,
    load_concept_images,
    save_placeholder_token,
    train_customization,
)


def write_default_concept(folder: Path, count: int = 6) -> None:
    """The offline concept: ``count`` sneaker images (class 7) of the Fashion-MNIST subset, as RGB PNGs."""
    from PIL import Image

    from hf_vitcompress.data import load_fashion_mnist

    images, labels = load_fashion_mnist("calibration")
    for index, image in enumerate(images[labels == 7][:count]):
        Image.fromarray(np.stack([image] * 3, axis=-1)).save(folder / f"sneaker_{index}.png")


def load_pipeline(pretrained: str | None, device: str):
    if pretrained is None:
        return tiny_pipeline(seed=0).to(device), IMAGE_SIZE
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pretrained, safety_checker=None, requires_safety_checker=False)
    return pipe.to(device), pipe.unet.config.sample_size * pipe.vae_scale_factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained", default=None, help="a diffusers Stable Diffusion folder (default: tiny, offline)"
    )
    parser.add_argument("--images", default=None, help="folder of concept images (default: Fashion-MNIST sneakers)")
    parser.add_argument("--prompt", default="a photo of <v> sneaker")
    parser.add_argument("--placeholder-token", default="<v>")
    parser.add_argument("--initializer-token", default="sneaker", help="a word whose embedding <v> starts from")
    parser.add_argument("--no-train-token", action="store_true", help="train only the adapter, not <v>'s embedding")
    parser.add_argument("--rank-per-head", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2.5e-3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--samples", type=int, default=2, help="images generated with the prompt after training")
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--output", default="customized")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.placeholder_token not in args.prompt:
        parser.error(f"--prompt must contain the placeholder token {args.placeholder_token!r}.")

    pipe, resolution = load_pipeline(args.pretrained, args.device)
    pipe.set_progress_bar_config(disable=True)
    token_id = add_placeholder_token(pipe, args.placeholder_token, args.initializer_token)
    if args.images is None:
        concept_dir = Path(tempfile.mkdtemp(prefix="concept-"))
        write_default_concept(concept_dir)
    else:
        concept_dir = Path(args.images)
    images = load_concept_images(concept_dir, resolution)
    latents = encode_images(pipe, images, torch.Generator().manual_seed(args.seed))

    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    config = HeadLowRankAdapterConfig(rank_per_head=args.rank_per_head, targets=("attn1", "attn2"), alpha=args.alpha)
    modules = add_head_lowrank_adapter(pipe.unet, config, "concept")
    parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    print(
        f"{len(images)} images at {resolution} px; adapter on {len(modules)} attentions: "
        f"{sum(p.numel() for p in parameters):,} trainable parameters "
        f"(UNet: {sum(p.numel() for p in pipe.unet.parameters()):,})"
    )
    record = train_customization(
        pipe,
        latents,
        args.prompt,
        parameters,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        placeholder_token_id=None if args.no_train_token else token_id,
        log_every=max(1, args.steps // 5),
    )
    print(f"{record.seconds_per_step * 1e3:.1f} ms per training step (median)")

    output = Path(args.output)
    save_head_lowrank_adapter(pipe.unet, output, "concept")
    if not args.no_train_token:
        save_placeholder_token(pipe, args.placeholder_token, output)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    with torch.no_grad():
        samples = pipe(
            [args.prompt] * args.samples,
            num_inference_steps=args.inference_steps,
            height=resolution,
            width=resolution,
            generator=generator,
        ).images
    for index, image in enumerate(samples):
        image.save(output / f"sample_{index}.png")
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1024:.1f} KiB" for p in sorted(output.glob("*.safetensors")))
    print(f"saved to {output}/: {sizes}; {len(samples)} samples")


if __name__ == "__main__":
    main()
