"""Pure tensor math of distillation losses, summed over the counted positions ([tokens, vocab] logits).

forward KL(teacher || student) makes the student cover the teacher's mass; reverse KL(student ||
teacher) makes it seek the teacher's modes; the generalized JSD (GKD, Agarwal et al.) interpolates
with `beta`. With a temperature T the logits are divided by T and the loss scaled by T^2, so its
gradients keep their size (Hinton et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _logprobs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    return F.log_softmax(student.float() / temperature, -1), F.log_softmax(teacher.float() / temperature, -1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    s, t = _logprobs(student, teacher, temperature)
    return (t.exp() * (t - s)).sum() * temperature**2


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    s, t = _logprobs(student, teacher, temperature)
    return (s.exp() * (s - t)).sum() * temperature**2


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student.
    Both terms vanish at the ends, so beta = 0 and 1 are taken as forward and reverse KL (as TRL does)."""
    s, t = _logprobs(student, teacher, temperature)
    if beta <= 0:
        return (t.exp() * (t - s)).sum() * temperature**2
    if beta >= 1:
        return (s.exp() * (s - t)).sum() * temperature**2
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    jsd = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return jsd.sum() * temperature**2


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed over positions: mean squared difference of the final hidden states, per position."""
    return (student.float() - teacher.float()).pow(2).mean(-1).sum()


def topk_forward_kl(student: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Forward KL from the teacher's distribution renormalized over its cached top k ([tokens, k] logits
    and vocabulary indices) to the student's full distribution, read at those k entries. The student's
    mass outside them is penalized through its normalization; with k = vocab this is forward_kl."""
    t = F.log_softmax(teacher_values.float() / temperature, -1)
    s = F.log_softmax(student.float() / temperature, -1).gather(-1, teacher_indices.long())
    return (t.exp() * (t - s)).sum() * temperature**2
