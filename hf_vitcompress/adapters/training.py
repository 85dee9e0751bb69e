"""Customization training for a text-to-image pipeline: the loop the example and the benchmark share.

DreamBooth / Custom Diffusion style: a few images of a concept and a prompt with a placeholder token
(``"a photo of <v> dog"``); the usual denoising loss (noise the images' latents at a random timestep,
predict the noise, or the velocity for v-prediction models). Only what the caller passes as
``parameters`` is optimized (the adapter, or a LoRA); the placeholder token's embedding can be trained
too, and only its row moves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_concept_images(folder: str | Path, resolution: int) -> torch.Tensor:
    """Every image of ``folder`` as RGB, resized and center-cropped to ``resolution``, in ``[-1, 1]``
    (what a Stable Diffusion VAE encodes): ``[n, 3, resolution, resolution]``."""
    from PIL import Image

    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not paths:
        raise FileNotFoundError(
            f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}: give a folder with a few pictures of the concept."
        )
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            image = image.resize(
                (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                Image.BICUBIC,
            )
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(tensors)


def add_placeholder_token(pipe, token: str, initializer: str | None = None) -> int:
    """Add ``token`` to the pipeline's tokenizer and text encoder (its embedding starts as ``initializer``'s,
    when given and known); returns its id."""
    if pipe.tokenizer.add_tokens([token]) == 0:
        raise ValueError(f"The tokenizer already has {token!r}: choose a placeholder that is not a word (e.g. '<v>').")
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    if initializer:
        ids = pipe.tokenizer(initializer, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == pipe.tokenizer.unk_token_id:
            raise ValueError(f"--initializer-token {initializer!r} must be one known token of the tokenizer.")
        with torch.no_grad():
            embeddings = pipe.text_encoder.get_input_embeddings().weight
            embeddings[token_id] = embeddings[ids[0]]
    return token_id


PLACEHOLDER_NAME = "placeholder_token.safetensors"


def save_placeholder_token(pipe, token: str, directory: str | Path) -> Path:
    """Write ``token``'s trained embedding (``{token: vector}``) beside the adapter in ``directory``."""
    from safetensors.torch import save_file

    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == pipe.tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer has no token {token!r} to save.")
    path = Path(directory) / PLACEHOLDER_NAME
    embedding = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().cpu().clone()
    save_file({token: embedding}, str(path))
    return path


def load_placeholder_token(pipe, directory: str | Path) -> str:
    """Add the token saved by :func:`save_placeholder_token` to ``pipe`` with its embedding; returns it."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / PLACEHOLDER_NAME))
    if len(saved) != 1:
        raise ValueError(f"{Path(directory) / PLACEHOLDER_NAME} should hold one token embedding, holds {len(saved)}.")
    ((token, embedding),) = saved.items()
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    if embedding.shape != embeddings.shape[1:]:
        raise ValueError(
            f"The saved embedding of {token!r} is {tuple(embedding.shape)}; this text encoder's are {tuple(embeddings.shape[1:])}."
        )
    token_id = add_placeholder_token(pipe, token)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[token_id] = embedding.to(embeddings)
    return token


def prompt_ids(pipe, prompt: str) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule, for training.

    The pipeline's own scheduler may be an inference sampler (Euler, DPM-Solver) whose ``add_noise``
    works in sigmas at its inference timesteps; diffusers' training scripts noise with DDPM too."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {kind!r} (epsilon or v_prediction).")


def denoising_loss(unet, scheduler, latents, context, noise, timesteps) -> torch.Tensor:
    """MSE between ``unet``'s prediction for the noised latents and the noise (or velocity) it should predict."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, context).sample
    return F.mse_loss(prediction.float(), _target(scheduler, latents, noise, timesteps).float())


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    vae = pipe.vae
    images = images.to(vae.device, vae.dtype)
    return vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor


@dataclass
class FixedDenoisingSet:
    """The same latents, noise and timesteps every time: a loss two methods can be compared on."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def build(cls, pipe, latents: torch.Tensor, repeats: int, seed: int) -> FixedDenoisingSet:
        generator = torch.Generator().manual_seed(seed)
        latents = latents.repeat(repeats, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = pipe.scheduler.config.num_train_timesteps
        timesteps = torch.linspace(0, steps - 1, len(latents)).round().long().to(latents.device)
        return cls(latents, noise, timesteps)

    @torch.no_grad()
    def loss(self, pipe, context: torch.Tensor) -> float:
        scheduler = training_scheduler(pipe)
        losses = []
        for start in range(0, len(self.latents), 8):
            part = slice(start, start + 8)
            batch_context = context.expand(len(self.latents[part]), -1, -1)
            losses.append(
                denoising_loss(
                    pipe.unet, scheduler, self.latents[part], batch_context, self.noise[part], self.timesteps[part]
                )
            )
        return float(torch.stack(losses).mean())


@dataclass
class TrainingRecord:
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = math.nan


def train_customization(
    pipe,
    latents: torch.Tensor,
    prompt: str,
    parameters: list[torch.nn.Parameter],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int = 1,
    seed: int = 0,
    placeholder_token_id: int | None = None,
    log_every: int = 0,
) -> TrainingRecord:
    """Optimize ``parameters`` (AdamW, no weight decay) on the denoising loss of ``latents`` under ``prompt``.

    With ``placeholder_token_id``, the text encoder's embedding of that token is trained too (the other
    rows get zero gradient, and with no weight decay they do not move). Returns the per-step losses and
    the median step time (after 3 warm-up steps).
    """
    if steps < 1 or not parameters and placeholder_token_id is None:
        raise ValueError("Nothing to train: give steps >= 1 and at least one trainable parameter.")
    ids = prompt_ids(pipe, prompt).to(pipe.unet.device)
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    trainable = list(parameters)
    handle = None
    if placeholder_token_id is not None:
        embeddings.requires_grad_(True)
        row = torch.zeros(len(embeddings), 1, device=embeddings.device, dtype=embeddings.dtype)
        row[placeholder_token_id] = 1
        handle = embeddings.register_hook(lambda grad: grad * row)
        trainable.append(embeddings)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    scheduler = training_scheduler(pipe)
    record, times = TrainingRecord(), []
    fixed_context = None
    if placeholder_token_id is None:  # the text encoder is frozen: encode the prompt once
        with torch.no_grad():
            fixed_context = pipe.text_encoder(ids)[0]
    pipe.unet.train()
    try:
        for step in range(steps):
            start = time.perf_counter()
            chosen = torch.randint(len(latents), (batch_size,), generator=generator)
            batch = latents[chosen]
            noise = torch.randn(batch.shape, generator=generator).to(batch)
            timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
            context = (fixed_context if fixed_context is not None else pipe.text_encoder(ids)[0]).expand(
                batch_size, -1, -1
            )
            loss = denoising_loss(pipe.unet, scheduler, batch, context, noise, timesteps.to(batch.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record.losses.append(loss.item())  # waits for the device: the step time below is the real one
            times.append(time.perf_counter() - start)
            if log_every and (step + 1) % log_every == 0:
                recent = record.losses[-log_every:]
                print(f"step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f}")
    finally:
        pipe.unet.eval()
        if handle is not None:
            handle.remove()
            embeddings.requires_grad_(False)
    measured = sorted(times[3:] or times)
    record.seconds_per_step = measured[len(measured) // 2]
    return record
