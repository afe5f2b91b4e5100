"""Pure recoverability metrics: accuracy (precision@|bag|), cosine, entropies, Fano bound in bits."""

from __future__ import annotations

import math

import numpy as np
import torch


def binary_entropy_bits(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def fano_mi_lower_bound_bits(accuracy: float, vocab_size: int, token_entropy_bits: float | None = None) -> float:
    """I(T;E) >= H(T) - H_b(Pe) - Pe*log2(|V|-1), clipped at 0.

    H(T) defaults to log2|V| (the paper's uniform-token assumption); pass the empirical unigram
    entropy of the evaluation corpus for the tighter variant. Vacuous (0) at low accuracy.
    """
    pe = min(max(1.0 - accuracy, 0.0), 1.0)
    h_t = math.log2(vocab_size) if token_entropy_bits is None else token_entropy_bits
    bound = h_t - binary_entropy_bits(pe) - pe * math.log2(vocab_size - 1)
    return max(bound, 0.0)


def unigram_entropy_bits(token_counts: np.ndarray | torch.Tensor) -> float:
    """Entropy in bits of the empirical token distribution given counts per vocabulary id."""
    c = torch.as_tensor(token_counts, dtype=torch.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * torch.log2(p)).sum())


@torch.no_grad()
def recoverability_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sentence precision@k with k = |bag|: top-k vocabulary ids by score vs the bag.

    scores, targets: (B, V) -> (B,). Sentences with an empty bag get NaN (excluded by nanmean).
    """
    k = targets.sum(1).long()  # (B,)
    kmax = int(k.max().item()) if k.numel() else 0
    if kmax == 0:
        return torch.full((scores.shape[0],), float("nan"), device=scores.device)
    top = scores.topk(kmax, dim=1).indices  # (B, kmax)
    hit = targets.gather(1, top).float()  # (B, kmax)
    keep = torch.arange(kmax, device=scores.device).unsqueeze(0) < k.unsqueeze(1)  # (B, kmax)
    acc = (hit * keep).sum(1) / k.clamp(min=1)
    return acc.masked_fill(k == 0, float("nan"))


@torch.no_grad()
def bag_cosine(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cosine between predicted probabilities and the multi-hot bag, per sentence. (B, V) -> (B,)"""
    return torch.nn.functional.cosine_similarity(probs.float(), targets.float(), dim=1)
