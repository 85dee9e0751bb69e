"""``DistillationArguments``: ``TrainingArguments`` plus what distillation needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import DISTILLATION_KINDS
from .schedules import SCHEDULE_KINDS, Schedule


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments for :class:`~hf_vitcompress.DistillationTrainer`.

    The loss is ``(1 - alpha)·CE(labels) + alpha·KD + w(t)·MSE(features)`` (for a backbone, whose output has
    no logits, KD is the mean squared error to the teacher's ``last_hidden_state`` and ``alpha`` must be 1),
    where ``w`` follows
    ``feature_weight_schedule`` from ``feature_weight`` to 0 over training (alignment helps early,
    when the student's features are far from the teacher's, and would fight the task loss late).
    """

    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the distillation term; 1 - alpha weighs cross-entropy on the labels."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of soft distillation."})
    kind: str = field(
        default="soft",
        metadata={
            "help": f"One of {DISTILLATION_KINDS}: KL to the teacher's softened distribution, or CE to its top-1."
        },
    )
    feature_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Hidden states to align (0 = embeddings, i = output of block i, -1 = last)."},
    )
    feature_weight: float = field(default=0.0, metadata={"help": "Initial weight of the feature alignment term."})
    feature_weight_schedule: str = field(
        default="linear",
        metadata={"help": f"How the feature weight decays to 0 over training: one of {SCHEDULE_KINDS}."},
    )
    evaluate_teacher: bool = field(
        default=True,
        metadata={"help": "Also evaluate the teacher (once per evaluation set) and log eval_teacher_* metrics."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive; got {self.temperature}.")
        if self.kind not in DISTILLATION_KINDS:
            raise ValueError(f"kind must be one of {DISTILLATION_KINDS}; got {self.kind!r}.")
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0; got {self.feature_weight}.")
        if self.feature_weight > 0 and not self.feature_layers:
            raise ValueError("feature_weight > 0 needs feature_layers (e.g. [-1] for the last block's output).")
        if self.feature_weight_schedule == "exponential":
            raise ValueError("feature_weight_schedule cannot be 'exponential' (it decays to 0); use linear or cosine.")
        Schedule(self.feature_weight, 0.0, self.feature_weight_schedule)  # raises on an unknown kind

    @property
    def feature_schedule(self) -> Schedule:
        return Schedule(self.feature_weight, 0.0, self.feature_weight_schedule)
