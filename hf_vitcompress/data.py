"""Offline image data: Fashion-MNIST (full set when installed, a shipped subset otherwise).

Nothing here touches the network. The full data set is looked up where Debian's
``dataset-fashion-mnist`` package installs it (or where ``HF_VITCOMPRESS_FASHION_MNIST``
points); a small subset (1,024 training images for calibration, 2,000 test images for
evaluation) ships inside the package with its MIT license so the demo always runs.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-pixel statistics of the Fashion-MNIST training set, used by the shipped model's processor.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_DIR = PACKAGE_DIR / "default"
SUBSET_PATH = DEFAULT_DIR / "fashion_mnist_subset.npz"
DEFAULT_MODEL_DIR = DEFAULT_DIR / "model"
SHIPPED_CALIBRATION_DESCRIPTION = "Fashion-MNIST training images shipped with hf_vitcompress"

_FULL_CANDIDATES = (
    "/usr/share/datasets/fashion-mnist",  # Debian: apt-get install dataset-fashion-mnist
)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """Return the folder holding the four Fashion-MNIST IDX files, or ``None`` if absent."""
    candidates = [root] if root is not None else []
    if os.environ.get("HF_VITCOMPRESS_FASHION_MNIST"):
        candidates.append(os.environ["HF_VITCOMPRESS_FASHION_MNIST"])
    candidates.extend(_FULL_CANDIDATES)
    for candidate in candidates:
        path = Path(candidate)
        if (path / "t10k-images-idx3-ubyte.gz").is_file() and (path / "train-images-idx3-ubyte.gz").is_file():
            return path
    if root is not None:
        raise FileNotFoundError(
            f"No Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) in {root!s}. "
            "Install them with `apt-get install dataset-fashion-mnist` or point to the folder that holds them."
        )
    return None


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST as ``(images uint8 [n, 28, 28], labels int64 [n])``.

    ``split`` is ``"train"`` or ``"test"`` for the full data set, or ``"calibration"`` /
    ``"test_subset"`` for the subset shipped with the package. ``"test"`` falls back to the
    shipped subset when the full data set is not installed.
    """
    if split in ("calibration", "test_subset"):
        with np.load(SUBSET_PATH) as subset:
            key = "calibration" if split == "calibration" else "test"
            return subset[f"{key}_images"], subset[f"{key}_labels"].astype(np.int64)
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}: use 'train', 'test', 'calibration' or 'test_subset'.")
    folder = find_fashion_mnist(root)
    if folder is None:
        if split == "test":
            return load_fashion_mnist("test_subset")
        raise FileNotFoundError(
            "The full Fashion-MNIST training set is not installed. Run `apt-get install dataset-fashion-mnist` "
            "or set HF_VITCOMPRESS_FASHION_MNIST to the folder holding its IDX files."
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, 28, 28]`` → normalized float ``[n, 1, 28, 28]`` as the shipped processor would."""
    pixels = torch.tensor(images, dtype=torch.float32).div_(255.0)  # a copy: the source may be read-only
    return ((pixels - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)


def iterate_batches(
    images: np.ndarray, labels: np.ndarray | None = None, batch_size: int = 256
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"pixel_values", "labels"}`` batches, the format ``compress`` and ``evaluate`` take."""
    for start in range(0, len(images), batch_size):
        batch = {"pixel_values": to_pixel_values(images[start : start + batch_size])}
        if labels is not None:
            batch["labels"] = torch.from_numpy(labels[start : start + batch_size])
        yield batch


class ExampleDataset(torch.utils.data.Dataset):
    """In-memory ``{"pixel_values", "labels"}`` examples: the dataset form ``Trainer`` takes."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if labels is not None and len(labels) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(labels)} labels.")
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.pixel_values[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item
