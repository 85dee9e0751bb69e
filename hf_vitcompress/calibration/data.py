"""Turn whatever the user passes as calibration data into checked ``pixel_values`` batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used (empty, wrongly shaped, non-finite)."""


def _pixel_values_of(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict) or hasattr(item, "keys"):
        if "pixel_values" not in item:
            raise CalibrationDataError(
                f"Calibration batches must hold 'pixel_values'; got a batch with keys {sorted(item.keys())}. "
                "Run the model's image processor over the images first."
            )
        return torch.as_tensor(item["pixel_values"])
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise CalibrationDataError(
        f"Cannot read pixel values from a calibration item of type {type(item).__name__}: pass a DataLoader / "
        "iterable of {'pixel_values': tensor} batches, a datasets.Dataset with a 'pixel_values' column, or a tensor."
    )


def _raw_batches(data: Any, batch_size: int) -> Iterator[Any]:
    if data is None:
        raise CalibrationDataError(
            "No calibration data was given: activation-aware compression needs a few hundred images "
            "(only whitening='none' with compensation_rank=0, i.e. plain weight SVD, runs without data)."
        )
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
    elif isinstance(data, dict):
        yield data
    elif hasattr(data, "column_names") and hasattr(data, "iter"):  # datasets.Dataset
        if "pixel_values" not in data.column_names:
            raise CalibrationDataError(
                f"The calibration Dataset has columns {data.column_names} but no 'pixel_values'. "
                "Map the image processor over it (or use with_transform) first."
            )
        yield from data.with_format("torch").iter(batch_size=batch_size)
    elif isinstance(data, Iterable):
        yield from data
    else:
        raise CalibrationDataError(f"Calibration data of type {type(data).__name__} is not iterable.")


def iter_calibration_batches(
    data: Any,
    *,
    max_samples: int,
    num_channels: int,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Yield checked ``[b, C, H, W]`` batches until ``max_samples`` images have been produced.

    Raises :class:`CalibrationDataError` for empty data, wrong shapes or non-finite values, naming
    what was expected, before any model is touched.
    """
    seen = 0
    for item in _raw_batches(data, batch_size):
        pixels = _pixel_values_of(item)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 4 or pixels.shape[1] != num_channels:
            raise CalibrationDataError(
                f"Calibration pixel_values must have shape (batch, {num_channels}, height, width); got {tuple(pixels.shape)}."
            )
        if image_size is not None and tuple(pixels.shape[-2:]) != tuple(image_size):
            raise CalibrationDataError(
                f"Calibration images are {tuple(pixels.shape[-2:])} but the model expects {tuple(image_size)}: "
                "resize them with the model's image processor."
            )
        if not pixels.is_floating_point():
            raise CalibrationDataError(
                f"Calibration pixel_values have dtype {pixels.dtype}; pass normalized float tensors (the image processor's output)."
            )
        if not torch.isfinite(pixels).all():
            raise CalibrationDataError("Calibration pixel_values contain NaN or infinite values.")
        pixels = pixels[: max_samples - seen]
        if pixels.shape[0] == 0:
            continue
        seen += pixels.shape[0]
        yield pixels.to(device=device, dtype=dtype)
        if seen >= max_samples:
            return
    if seen == 0:
        raise CalibrationDataError(
            "The calibration data is empty: pass at least one image (a few hundred are recommended)."
        )


def image_size_of(config: Any) -> tuple[int, int]:
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)
