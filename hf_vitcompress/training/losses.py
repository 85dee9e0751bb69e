"""Distillation losses in closed form (kept separate from the Trainer so they are tested on fixed logits)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DISTILLATION_KINDS = ("soft", "hard")


def soft_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch (Hinton et al.).

    The ``T²`` factor keeps the gradient scale independent of ``T``, so ``alpha`` means the same thing
    at every temperature.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's top-1 class (DeiT's hard distillation, used by COMCAT)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float = 1.0
) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must predict the same label space as the student."
        )
    if kind == "soft":
        return soft_distillation_loss(student_logits, teacher_logits, temperature)
    if kind == "hard":
        return hard_distillation_loss(student_logits, teacher_logits)
    raise ValueError(f"Unknown distillation kind {kind!r}; choose one of {DISTILLATION_KINDS}.")


def feature_alignment_loss(
    student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], layers: Sequence[int]
) -> torch.Tensor:
    """Mean over ``layers`` of the MSE between student and teacher hidden states (index 0 = embeddings,
    ``i`` = output of block ``i``, negative indices count from the end)."""
    losses = []
    for index in layers:
        try:
            student, teacher = student_states[index], teacher_states[index]
        except IndexError:
            raise ValueError(
                f"feature layer {index} does not exist: the student has {len(student_states)} hidden states "
                f"and the teacher {len(teacher_states)} (0 = embeddings, i = output of block i)."
            ) from None
        if student.shape != teacher.shape:
            raise ValueError(
                f"Cannot align hidden state {index}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}."
            )
        losses.append(F.mse_loss(student.float(), teacher.float()))
    return torch.stack(losses).mean()
