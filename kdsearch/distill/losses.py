"""The student's objective: L = (1 - alpha) CE(student, label) + alpha T^2 KL(teacher_T || student_T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Eq. 1-3 of the paper, batch mean.

    The KL term is scaled by T^2 (Hinton et al.) so its gradient magnitude does not shrink as 1/T^2
    when T grows; without it alpha would mean something different at every temperature. With
    alpha == 0 this is exactly cross-entropy and the teacher is not needed.
    """
    hard = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    if teacher_logits is None:
        raise ValueError("kd_loss with alpha > 0 needs teacher logits")
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature**2 * soft
