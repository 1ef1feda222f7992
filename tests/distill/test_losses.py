import math

import pytest
import torch
import torch.nn.functional as F

from kdsearch.distill.losses import kd_loss


def test_alpha_zero_is_exactly_cross_entropy():
    student, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(kd_loss(student, None, labels, 0.0, 2.5), F.cross_entropy(student, labels))


def test_matches_a_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0]])
    labels = torch.tensor([0])
    alpha, temperature = 0.3, 2.0

    def softmax(values):
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    p_student = softmax([v / temperature for v in student[0].tolist()])
    p_teacher = softmax([v / temperature for v in teacher[0].tolist()])
    cross_entropy = -math.log(softmax(student[0].tolist())[0])
    kl = sum(t * math.log(t / s) for t, s in zip(p_teacher, p_student, strict=True))
    expected = (1 - alpha) * cross_entropy + alpha * temperature**2 * kl
    assert kd_loss(student, teacher, labels, alpha, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_kl_term_is_a_batch_mean():
    student, teacher, labels = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    whole = kd_loss(student, teacher, labels, 1.0, 3.0)
    halves = [kd_loss(student[i : i + 2], teacher[i : i + 2], labels[i : i + 2], 1.0, 3.0) for i in (0, 2)]
    assert whole.item() == pytest.approx(sum(h.item() for h in halves) / 2, rel=1e-5)


def test_identical_logits_leave_only_cross_entropy():
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    loss = kd_loss(logits, logits.clone(), labels, 0.4, 2.5)
    assert loss.item() == pytest.approx(0.6 * F.cross_entropy(logits, labels).item(), abs=1e-6)
