"""Fresh linear decoders fitted on frozen features: the measurement behind every before/after number.

- ``fit_ridge``: closed-form least squares onto the multi-hot bag (fast; all layers in one batched solve).
- ``fit_bce``: the paper's decoder, a linear layer trained with bag-of-tokens BCE (full batch, Adam).
Both work on features shaped (L, N, D) so a probe fits every layer together; targets are (N, V).
Features are z-scored per layer with training statistics (layers differ in scale by orders of magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .losses import recoverability_loss
from .metrics import bag_cosine, fano_mi_lower_bound_bits, recoverability_accuracy


def bags_from_ids(seqs: list[list[int]], vocab_size: int, exclude_ids) -> torch.Tensor:
    """Multi-hot (N, V) float32 targets from token id lists, special/pad ids excluded."""
    exclude = set(int(i) for i in exclude_ids)
    y = torch.zeros(len(seqs), vocab_size)
    for i, s in enumerate(seqs):
        ids = [t for t in set(s) if t not in exclude and 0 <= t < vocab_size]
        if ids:
            y[i, ids] = 1.0
    return y


@dataclass
class LinearDecoders:
    """Per-layer decoders: scores = ((X - mean) / std) @ W + b. W: (L, D, V), b: (L, V)."""

    mean: torch.Tensor  # (L, 1, D)
    std: torch.Tensor  # (L, 1, D)
    W: torch.Tensor  # (L, D, V)
    b: torch.Tensor  # (L, 1, V)

    def scores(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """(N, D) features of one layer -> (N, V) scores."""
        return ((X - self.mean[layer]) / self.std[layer]) @ self.W[layer] + self.b[layer]


def _standardize(X: torch.Tensor):
    mean = X.mean(1, keepdim=True)  # (L, 1, D)
    std = X.std(1, keepdim=True).clamp(min=1e-6)
    return (X - mean) / std, mean, std


def fit_ridge(X: np.ndarray | torch.Tensor, Y: torch.Tensor, lam: float = 1.0) -> LinearDecoders:
    """X: (L, N, D), Y: (N, V). Solves (Z^T Z + lam N I) W = Z^T (Y - ybar) for every layer at once."""
    X = torch.as_tensor(X, dtype=torch.float32)
    Z, mean, std = _standardize(X)  # (L, N, D)
    n, d = Z.shape[1], Z.shape[2]
    ybar = Y.mean(0, keepdim=True)  # (1, V)
    gram = Z.transpose(1, 2) @ Z + lam * n * torch.eye(d)  # (L, D, D)
    rhs = Z.transpose(1, 2) @ (Y - ybar)  # (L, D, V)
    W = torch.linalg.solve(gram, rhs)  # (L, D, V)
    return LinearDecoders(mean, std, W, ybar.expand(X.shape[0], -1).unsqueeze(1).clone())


def fit_bce(X: np.ndarray | torch.Tensor, Y: torch.Tensor, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 0.0,
            batch_size: int = 512, seed: int = 0) -> LinearDecoders:
    """The paper's decoder: sigmoid(W E + b) trained with bag BCE, all layers in parallel (Adam)."""
    X = torch.as_tensor(X, dtype=torch.float32)
    Z, mean, std = _standardize(X)
    L, n, d = Z.shape
    V = Y.shape[1]
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(L, d, V, requires_grad=True)
    prior = Y.mean(0).clamp(1e-6, 1 - 1e-6)
    b = torch.log(prior / (1 - prior)).expand(L, 1, V).clone().requires_grad_(True)  # start at the unigram base rate
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start: start + batch_size]
            logits = Z[:, idx] @ W + b  # (L, B, V)
            loss = sum(recoverability_loss(logits[i], Y[idx]) for i in range(L))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return LinearDecoders(mean, std, W.detach(), b.detach())


def evaluate_scores(scores: torch.Tensor, Y: torch.Tensor, vocab_size: int, token_entropy_bits: float | None = None,
                    linear: bool = False) -> dict:
    """Recoverability metrics of decoder scores (N, V) against bags (N, V).

    ``linear``: the scores are least-squares predictions of the bag (ridge), so the predicted
    probabilities for the cosine are the scores clipped to [0, 1]; otherwise they are logits.
    """
    acc = recoverability_accuracy(scores, Y)
    acc = float(acc[~torch.isnan(acc)].mean())
    probs = scores.clamp(0, 1) if linear else torch.sigmoid(scores)
    cos = float(bag_cosine(probs, Y).mean())
    out = {"recoverability_acc": acc, "cosine": cos,
           "mi_lb_bits": fano_mi_lower_bound_bits(acc, vocab_size)}
    if token_entropy_bits is not None:
        out["mi_lb_bits_empirical"] = fano_mi_lower_bound_bits(acc, vocab_size, token_entropy_bits)
    return out
