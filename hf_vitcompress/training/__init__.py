"""Recovery fine-tuning: distillation Trainer, training arguments, compression callbacks and schedules."""

from .arguments import DistillationArguments
from .callbacks import CompressionCallback, CompressionController, FixedMasks, plan_summary
from .losses import distillation_loss, feature_alignment_loss, hard_distillation_loss, soft_distillation_loss
from .schedules import Schedule, training_progress
from .trainer import DistillationTrainer, check_teacher

__all__ = [
    "CompressionCallback",
    "CompressionController",
    "DistillationArguments",
    "DistillationTrainer",
    "FixedMasks",
    "Schedule",
    "check_teacher",
    "distillation_loss",
    "feature_alignment_loss",
    "hard_distillation_loss",
    "plan_summary",
    "soft_distillation_loss",
    "training_progress",
]
