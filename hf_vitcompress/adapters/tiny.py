"""A tiny text-to-image pipeline built from configs, with random weights: what runs without the Hub.

No diffusion checkpoint installs offline, so the tests, ``examples/customize_diffusion.py`` and
``benchmarks/diffusion_adapter.py`` run on this stand-in. It has the architecture of Stable
Diffusion 1.x at toy size (a ``UNet2DConditionModel`` with self- and cross-attention transformer
blocks, an ``AutoencoderKL``, a CLIP text encoder, a DDPM noise schedule) and a small word-level
tokenizer; its outputs mean nothing, but every code path is the real one.
"""

from __future__ import annotations

import torch

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "an",
    "in",
    "on",
    "with",
    "dog",
    "cat",
    "toy",
    "bag",
    "shoe",
    "shirt",
    "dress",
    "sneaker",
    "sandal",
    "boot",
    "coat",
    "trouser",
    "pullover",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "style",
    "painting",
    "beach",
    "snow",
    "city",
]
"""The tiny tokenizer's vocabulary (plus special tokens); anything else maps to ``<unk>``."""

IMAGE_SIZE = 32
"""Pixels per side of the tiny pipeline's images (latents are 16 × 16 × 4)."""


def tiny_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """A word-level ``PreTrainedTokenizerFast`` (CLIP-style padding to 16 tokens) with ``extra_tokens`` added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    vocabulary = {token: index for index, token in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(  # CLIP's "<bos> words <eos>" framing
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[
            ("<|startoftext|>", vocabulary["<|startoftext|>"]),
            ("<|endoftext|>", vocabulary["<|endoftext|>"]),
        ],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        model_max_length=16,
    )
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32):
    """A ``UNet2DConditionModel`` with one cross-attention down and up block (8 heads; 4 attentions
    of each kind: self ``attn1`` and cross ``attn2``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_pipeline(seed: int = 0, extra_tokens: tuple[str, ...] = ()):
    """A ``StableDiffusionPipeline`` of tiny random components (no safety checker)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(extra_tokens)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed, cross_attention_dim=32),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
