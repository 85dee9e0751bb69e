"""Metrics that work offline.

* ``compute_metrics`` functions for ``Trainer``: :func:`top1`, :func:`top1_top5`.
* An ``evaluate`` module shipped inside the package, so ``evaluate.load`` never goes to the Hub::

      import evaluate, hf_vitcompress.metrics as m
      metric = evaluate.load(m.TOPK_ACCURACY_PATH)      # or m.load_topk_accuracy()
      metric.compute(predictions=logits, references=labels)   # {"top1": ..., "top5": ...}

``evaluate.load("accuracy")`` downloads its script from the Hub, so nothing here uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .functional import topk_accuracy

TOPK_ACCURACY_PATH = str(Path(__file__).resolve().parent / "topk_accuracy")


def _scores_and_labels(eval_prediction: Any) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(predictions, (tuple, list)):  # e.g. DeiT with teacher: (logits, cls_logits, distillation_logits)
        predictions = predictions[0]
    if labels is None:
        raise ValueError("compute_metrics got no labels: the evaluation dataset needs a 'labels' column.")
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    return np.asarray(predictions), np.asarray(labels)


def top1(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for ``Trainer``: ``{"top1": ...}`` (logged as ``eval_top1``)."""
    return topk_accuracy(*_scores_and_labels(eval_prediction), ks=(1,))


def top1_top5(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for ``Trainer``: ``{"top1": ..., "top5": ...}`` (top-5 left out under 6 classes)."""
    return topk_accuracy(*_scores_and_labels(eval_prediction), ks=(1, 5))


def load_topk_accuracy(**kwargs: Any):
    """``evaluate.load`` of the packaged top-k module (needs ``pip install evaluate``; never touches the Hub)."""
    try:
        import evaluate
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_topk_accuracy needs the `evaluate` package: pip install 'hf-vitcompress[metrics]'. "
            "The compute_metrics functions top1 / top1_top5 work without it."
        ) from error
    return evaluate.load(TOPK_ACCURACY_PATH, **kwargs)


__all__ = ["TOPK_ACCURACY_PATH", "load_topk_accuracy", "top1", "top1_top5", "topk_accuracy"]
