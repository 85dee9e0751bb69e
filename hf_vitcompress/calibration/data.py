"""Turn whatever the user passes as calibration data into checked ``pixel_values`` batches.

Images may have any size that is a multiple of the patch size, not only ``config.image_size``: users
calibrate at the resolution they serve, and a ViT serves other resolutions with
``interpolate_pos_encoding=True`` (DINOv2-style backbones at many). :func:`interpolated_positions`
makes every forward that compression runs do the same.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


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
            "(only plain weight SVD runs without data: whitening='none', loss_weighting='none', rank_allocation "
            "'uniform' or 'global', compensation_rank=0)."
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
    patch_size: tuple[int, int] | None = None,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Yield checked ``[b, C, H, W]`` batches until ``max_samples`` images have been produced.

    ``H`` and ``W`` may be any multiples of ``patch_size`` (the resolution the model will serve; see the
    module docstring); a size that is not would silently lose its border pixels in the patch embedding,
    so it is refused. Raises :class:`CalibrationDataError` for empty data, wrong shapes or non-finite
    values, naming what was expected, before any model is touched.
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
        if patch_size is not None:
            size = tuple(pixels.shape[-2:])
            if any(side < patch or side % patch for side, patch in zip(size, patch_size, strict=True)):
                raise CalibrationDataError(
                    f"Calibration images are {size} (height, width), which is not a multiple of the model's patch size "
                    f"{tuple(patch_size)}: resize them with the model's image processor to the resolution you serve at "
                    "(the model's image_size, or any multiple of the patch size with interpolate_pos_encoding=True)."
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


def image_config_of(config: Any) -> Any:
    """The config that describes the images: a two-tower model's (CLIP, SigLIP) ``vision_config``, else ``config``."""
    return getattr(config, "vision_config", None) or config


def image_size_of(config: Any) -> tuple[int, int]:
    size = image_config_of(config).image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def patch_size_of(config: Any) -> tuple[int, int]:
    size = image_config_of(config).patch_size
    return (size, size) if isinstance(size, int) else tuple(size)


def forward_needs_interpolation(model: nn.Module, pixel_values: torch.Tensor) -> bool:
    """Whether ``pixel_values`` differ in size from ``model.config.image_size`` (ViT/DeiT then refuse them
    unless asked to interpolate their position embeddings)."""
    return tuple(pixel_values.shape[-2:]) != image_size_of(model.config)


def takes_interpolation(forward: Any) -> bool:
    """Whether ``forward`` (a model, its ``forward``, or a method such as ``get_image_features``) takes
    ``interpolate_pos_encoding``: ViT-like models then serve other sizes than their own when asked."""
    return "interpolate_pos_encoding" in inspect.signature(getattr(forward, "forward", forward)).parameters


@contextmanager
def interpolated_positions(model: nn.Module) -> Iterator[nn.Module]:
    """While active, every forward of ``model`` on images of another size than ``config.image_size`` gets
    ``interpolate_pos_encoding=True`` (unless the call sets it itself).

    A hook rather than an argument, so that every forward compression runs (calibration passes, Taylor
    scores, the MAC count of the pruning budget in :func:`hf_vitcompress.evaluation.count_macs`) sees the
    images exactly as the user serves them, with one mechanism. At ``config.image_size`` nothing changes.
    Removed on exit, so a model handed back to the user never keeps it.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "image_size") or not takes_interpolation(model.forward):
        yield model
        return

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if kwargs.get("interpolate_pos_encoding") is not None or not isinstance(pixels, torch.Tensor):
            return None
        if pixels.dim() == 4 and forward_needs_interpolation(model, pixels):
            return args, {**kwargs, "interpolate_pos_encoding": True}
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()
