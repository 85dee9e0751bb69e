"""Held-out calibration images and the model-output error measured on them.

Which factorization is best differs between real models (full whitening wins on DINOv2-S, ASVD-style
scaling on a small MNIST ViT), and no per-layer criterion predicts it. So the choice is made by what the
user cares about: the compressed model's *output* on images the statistics never saw. One image in
``every`` of the calibration stream is held out (by its position in the whole stream, before it is split
between processes, so one process and several hold out the same images); the dense model's outputs on
them are the reference.

The error is the one a user of the model would feel:

* a classifier (the output has ``logits``): mean KL(dense ‖ compressed) of the predicted distributions;
* a backbone (``last_hidden_state``): relative squared error ``Σ‖ĥ − h‖² / Σ‖h‖²`` over the tokens
  (padding excluded when the batch has an ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import SINGLE_PROCESS, CalibrationProcesses

Batch = torch.Tensor | dict[str, Any]


class CalibrationSplit(NamedTuple):
    """One calibration batch cut in two: rows for the statistics and held-out rows (either may be ``None``),
    and the position of its first image in the whole calibration stream."""

    fit: Batch | None
    held_out: Batch | None
    position: int = 0


def batch_size(batch: Batch) -> int:
    if isinstance(batch, dict):
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.shape[0])
    return int(batch.shape[0])


def take_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The images ``rows`` of ``batch`` (every tensor of a dict batch whose first dimension is the batch)."""
    if isinstance(batch, dict):
        size = batch_size(batch)
        return {
            k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size else v
            for k, v in batch.items()
        }
    return batch[rows.to(batch.device)]


def split_for_validation(batches: Iterable[Batch | CalibrationSplit], every: int | None) -> Iterator[CalibrationSplit]:
    """Each batch with its stream position, the images at positions ``every - 1`` modulo ``every`` held out
    (none when ``every`` is ``None``).

    Items that are already :class:`CalibrationSplit` pass through unchanged (the split was made upstream,
    before the stream was shared between processes).
    """
    seen = 0
    for batch in batches:
        if isinstance(batch, CalibrationSplit):
            yield batch
            continue
        size = batch_size(batch)
        position, seen = seen, seen + size
        held = (
            torch.zeros(size, dtype=torch.bool)
            if every is None
            else (torch.arange(position, seen) % every) == every - 1
        )
        if not bool(held.any()):
            yield CalibrationSplit(batch, None, position)
        elif bool(held.all()):
            yield CalibrationSplit(None, batch, position)
        else:
            rows = torch.arange(size)
            yield CalibrationSplit(take_rows(batch, rows[~held]), take_rows(batch, rows[held]), position)


def forward_batch(model: nn.Module, batch: Batch) -> Any:
    """Vision models get ``pixel_values``; a dict batch is passed as keyword arguments (any encoder), labels
    left out (compression never needs the model's own loss)."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(pixel_values=batch)


def output_of(output: Any) -> tuple[str, torch.Tensor]:
    """``("logits", tensor)`` for a classifier's output, else ``("hidden", features)``: ``last_hidden_state``; for
    ``CLIPVisionModelWithProjection`` its ``image_embeds``; for a backbone (``Dinov2Backbone``) its
    ``feature_maps``, each flattened per image and concatenated: the error is measured on what the model's
    users consume (a retrieval index, a detection or segmentation head)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is not None:
        return "logits", logits
    image_embeds = getattr(output, "image_embeds", None)  # CLIP's ...WithProjection: the retrieval embedding
    if image_embeds is not None:
        return "hidden", image_embeds
    feature_maps = getattr(output, "feature_maps", None)
    if feature_maps is not None:
        return "hidden", torch.cat([feature_map.flatten(1) for feature_map in feature_maps], dim=1)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
    return "hidden", hidden


def token_mask(batch: Batch, output: torch.Tensor) -> torch.Tensor | None:
    """``[batch, tokens, 1]`` weights of the real (non-padding) tokens of a hidden-state output, or ``None``."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask = batch["attention_mask"]
        if mask.shape == output.shape[:2]:
            return mask.to(output.dtype)[..., None]
    return None


@dataclass
class HeldOutReference:
    """The dense model's outputs on this process's held-out images, and any model's error against them.

    Errors are kept per image (``per_image_errors``), scaled so that they sum, over all processes, to the
    metric of the module docstring; that is what lets :meth:`significantly_lower` ask whether one candidate
    beats another by more than the noise of a few dozen images.
    """

    batches: list[Batch] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    kind: str = "hidden"
    processes: CalibrationProcesses = SINGLE_PROCESS
    normalizer: float = 1.0  # all held-out images (logits) or all reference energy (hidden), on all processes

    @property
    def images(self) -> int:
        return sum(batch_size(b) for b in self.batches)

    def total_images(self) -> int:
        return int(self.processes.sum_numbers([self.images])[0]) if self.processes.is_distributed else self.images

    @torch.no_grad()
    def compute_outputs(self, model: nn.Module) -> None:
        """The reference: ``model``'s (the dense model's) outputs on the held-out batches."""
        self.outputs = []
        energy = 0.0
        for batch in self.batches:
            self.kind, output = output_of(forward_batch(model, batch))
            output = output.detach().to(torch.float32)
            self.outputs.append(output)
            mask = token_mask(batch, output)
            squares = output.double().square()
            energy += float((squares if mask is None else squares * mask).sum())
        images = float(self.images)
        logits = float(self.kind == "logits" and bool(self.batches))
        if self.processes.is_distributed:  # a process without held-out images must still agree on the metric
            logits, energy, images = self.processes.sum_numbers([logits, energy, images])
        self.kind = "logits" if logits > 0 else "hidden"
        self.normalizer = max(images, 1.0) if self.kind == "logits" else max(energy, 1e-30)

    @torch.no_grad()
    def per_image_errors(self, model: nn.Module) -> torch.Tensor:
        """``model``'s error on each of this process's held-out images (float64; see the class docstring)."""
        errors = []
        with self.processes.together("measuring candidates on the held-out images"):
            for batch, reference in zip(self.batches, self.outputs, strict=True):
                _, output = output_of(forward_batch(model, batch))
                output = output.to(torch.float32)
                if self.kind == "logits":
                    reference_log = F.log_softmax(reference.double(), -1)
                    divergence = reference_log.exp() * (reference_log - F.log_softmax(output.double(), -1))
                    errors.append(divergence.reshape(divergence.shape[0], -1).sum(-1))
                else:
                    difference = (output - reference).double().square()
                    mask = token_mask(batch, reference)
                    if mask is not None:
                        difference = difference * mask
                    errors.append(difference.reshape(difference.shape[0], -1).sum(-1))
        if not errors:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(errors).cpu() / self.normalizer

    def total(self, errors: torch.Tensor) -> float:
        """The metric: per-image errors summed over all processes."""
        value = float(errors.sum())
        return float(self.processes.sum_numbers([value])[0]) if self.processes.is_distributed else value

    def significantly_lower(self, errors: torch.Tensor, than: torch.Tensor, z: float = 2.0) -> bool:
        """Whether ``errors`` is lower in total than ``than`` by more than ``z`` standard errors of the paired
        per-image difference (so a candidate wins on evidence, not on the noise of a few held-out images)."""
        difference = (errors - than).double()
        numbers = [float(difference.sum()), float(difference.square().sum()), float(difference.numel())]
        if self.processes.is_distributed:
            numbers = self.processes.sum_numbers(numbers)
        total, squares, count = numbers
        if count < 1 or total >= 0:
            return False
        variance = max(squares - total * total / count, 0.0) * count / max(count - 1, 1)  # of the sum
        return -total > z * variance**0.5
