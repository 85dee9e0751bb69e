"""Top-k accuracy as an ``evaluate`` module that ships inside hf_vitcompress (no Hub download).

Load it with ``evaluate.load(hf_vitcompress.metrics.TOPK_ACCURACY_PATH)``. ``predictions`` are class
scores (logits or probabilities), one row per example; ``references`` are integer labels.
"""

import datasets
import evaluate
import numpy as np

from hf_vitcompress.metrics.functional import topk_accuracy

_DESCRIPTION = """Top-k accuracy: the fraction of examples whose label is among the k highest-scoring classes.
A k that is at least the number of classes is left out of the result (it would be 1.0 by construction)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class scores, shape (n, num_classes).
    references (`list` of `int`): labels.
    k (`list` of `int`, defaults to `[1, 5]`): which top-k accuracies to report.
Returns:
    `dict`: `{"top1": float, "top5": float}` (only the k below the number of classes, plus top-1).
Examples:
    >>> metric = evaluate.load(hf_vitcompress.metrics.TOPK_ACCURACY_PATH)
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], k=[1])
    {'top1': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        return topk_accuracy(np.asarray(predictions, dtype=np.float32), np.asarray(references), ks=tuple(k))
