"""``Schedule``: a value that moves from ``start`` to ``end`` over training (weights, temperatures).

One definition shared by everything that anneals: the feature-alignment weight of distillation here,
Gumbel-softmax temperatures and budget multipliers of the rank-search and pruning methods later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")


@dataclass(frozen=True)
class Schedule:
    """``value(progress)`` for ``progress`` in [0, 1] (clamped).

    ``exponential`` interpolates geometrically (``start·(end/start)^progress``), the usual choice for
    temperatures such as 5 → 0.1; it needs ``start`` and ``end`` of the same sign and non-zero.
    """

    start: float
    end: float | None = None
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"Unknown schedule kind {self.kind!r}; choose one of {SCHEDULE_KINDS}.")
        if self.kind == "exponential" and (self.end is None or self.start * self.end <= 0):
            raise ValueError(
                f"An exponential schedule needs non-zero start and end of the same sign; got {self.start} → {self.end}."
            )

    def value(self, progress: float) -> float:
        end = self.start if self.end is None else self.end
        t = min(max(float(progress), 0.0), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (end - self.start) * t
        if self.kind == "cosine":
            return end + (self.start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.start * (end / self.start) ** t


def training_progress(global_step: int, max_steps: int) -> float:
    """Fraction of training done, from a ``TrainerState``'s ``global_step`` and ``max_steps``."""
    return global_step / max_steps if max_steps and max_steps > 0 else 0.0
