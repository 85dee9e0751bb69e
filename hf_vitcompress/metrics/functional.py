"""Top-k accuracy in plain numpy: the one implementation behind ``compute_metrics``, the ``evaluate``
module and ``hf-vitcompress evaluate`` (importing ``evaluate`` costs seconds, so nothing needs it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` for class ``scores`` of shape ``(n, num_classes)`` and integer ``labels``.

    A ``k`` that is at least the number of classes is left out: its accuracy would be 1.0 by
    construction, which is not a measurement.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (n, num_classes); got {scores.shape}.")
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {labels.shape[0]} labels.")
    if scores.shape[0] == 0:
        raise ValueError("No examples to score: top-k accuracy needs at least one labelled example.")
    num_classes = scores.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}); got values in [{labels.min()}, {labels.max()}]. "
            "Does the model's label space match the dataset's?"
        )
    results = {}
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in ks:
        if k == 1 or k < num_classes:
            hits = (order[:, :k] == labels[:, None]).any(axis=1)
            results[f"top{k}"] = float(hits.mean())
    return results
