"""Fresh linear decoders fitted on frozen features: the measurement behind every before/after number.

- ``fit_ridge``: closed-form least squares onto the multi-hot bag (all layers in one batched eigendecomposition; the
  ridge strength can be chosen per layer by generalized cross-validation).
- ``fit_bce``: the paper's decoder, a linear layer trained with bag-of-tokens BCE (Adam, all layers in parallel).
Both work on features shaped (L, N, D) so a probe fits every layer together; targets are (N, V).
Features are z-scored per layer with training statistics (layers differ in scale by orders of magnitude).

Full vocabulary, stored compactly. Every vocabulary id gets an output, but the ids that never occur in a
training bag all have the same target (always 0) and the same initialisation, so they end with the same
weights: exactly 0 for ridge, and identical trajectories under (per-element) Adam for BCE. We therefore
store one column per id seen in training (``active``, A of them) plus ONE shared column that stands for
every never-seen id, W: (L, D, A+1) instead of (L, D, V). ``scores`` expands it back to (N, V), so the
ranking, top-k and cosine are those of the full-vocabulary decoder. For SmolLM2 (V = 49,152, A ~ 10k on
1,400 sentences) this is what makes 31 decoders fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .losses import recoverability_loss
from .metrics import bag_cosine, fano_mi_lower_bound_bits, recoverability_accuracy

# GCV grid for the ridge strength (multiplies N, on z-scored features): 1e-4 .. 1e2 in half decades.
RIDGE_GCV_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 5))


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
    """Per-layer decoders: scores = ((X - mean) / std) @ W + b over the full vocabulary, stored compactly.

    Columns 0..A-1 of W and b are the vocabulary ids ``active``; column A is shared by every other id.
    """

    mean: torch.Tensor  # (L, 1, D)
    std: torch.Tensor  # (L, 1, D)
    W: torch.Tensor  # (L, D, A+1)
    b: torch.Tensor  # (L, 1, A+1)
    active: torch.Tensor  # (A,) long: vocabulary ids of the first A columns
    vocab_size: int
    lam: torch.Tensor | None = None  # (L,) ridge strength used per layer (ridge only)

    def compact_scores(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """(N, D) features of one layer -> (N, A+1) scores; the last column is every never-seen id."""
        return ((torch.as_tensor(X, dtype=torch.float32) - self.mean[layer]) / self.std[layer]) @ self.W[layer] + self.b[layer]

    def scores(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """(N, D) features of one layer -> (N, V) scores of the full-vocabulary decoder."""
        return expand_scores(self.compact_scores(X, layer), self.active, self.vocab_size)


def expand_scores(compact: torch.Tensor, active: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, A+1) compact scores -> (N, V): active ids get their column, all others the shared last column."""
    out = compact[:, -1:].expand(-1, vocab_size).clone()  # (N, V)
    out[:, active] = compact[:, :-1]
    return out


def _standardize(X: torch.Tensor):
    mean = X.mean(1, keepdim=True)  # (L, 1, D)
    std = X.std(1, keepdim=True).clamp(min=1e-6)
    return (X - mean) / std, mean, std


def _compact_targets(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) bags -> ((N, A+1) targets of the ids seen in training + an all-zero shared column, (A,) ids)."""
    active = (Y.sum(0) > 0).nonzero().flatten()  # (A,)
    Yc = torch.cat([Y[:, active], torch.zeros(Y.shape[0], 1)], dim=1)  # (N, A+1)
    return Yc, active


def fit_ridge(X: np.ndarray | torch.Tensor, Y: torch.Tensor, lam: float | str | Sequence[float] = 1.0) -> LinearDecoders:
    """X: (L, N, D), Y: (N, V). Solves (Z^T Z + lam N I) W = Z^T (Y - ybar) for every layer at once.

    ``lam``: a number (all layers), one number per layer, or "gcv": per layer, the value of
    ``RIDGE_GCV_GRID`` with the lowest generalized cross-validation error (closed form from the
    eigendecomposition of Z^T Z, so choosing costs no refits). The intercept is ybar, so never-seen
    ids score exactly 0.
    """
    X = torch.as_tensor(X, dtype=torch.float32)
    Z, mean, std = _standardize(X)  # (L, N, D)
    L, n, d = Z.shape
    Yc, active = _compact_targets(Y)  # (N, A+1)
    ybar = Yc.mean(0, keepdim=True)  # (1, A+1)
    # Z^T (Y - ybar) through the sparse bag matrix: the dense product would cost N*D*A per layer.
    Yt = Yc.t().to_sparse()  # (A+1, N)
    ZtY = torch.stack([torch.sparse.mm(Yt, Z[i]).t() for i in range(L)])  # (L, D, A+1)
    ZtY -= Z.sum(1).unsqueeze(-1) * ybar  # Z^T 1 is ~0 for centred Z; kept for exactness
    evals, vecs = torch.linalg.eigh(Z.transpose(1, 2) @ Z)  # (L, D), (L, D, D); eigh of the Gram: much faster than an SVD of Z
    evals = evals.clamp(min=0)
    R = vecs.transpose(1, 2) @ ZtY  # (L, D, A+1): the targets' correlations in the eigenbasis
    del ZtY
    if isinstance(lam, str):
        if lam != "gcv":
            raise ValueError(f"lam={lam!r}: allowed a number, a list of numbers, or 'gcv'")
        lams = _gcv_lambdas(evals, R, Yc, n)
    else:
        lams = torch.full((L,), float(lam)) if np.ndim(lam) == 0 else torch.as_tensor(lam, dtype=torch.float32)
        if lams.numel() != L:
            raise ValueError(f"lam has {lams.numel()} values for {L} layers")
    W = vecs @ (R / (evals + lams.unsqueeze(1) * n).unsqueeze(-1))  # (L, D, A+1)
    return LinearDecoders(mean, std, W, ybar.expand(L, -1).unsqueeze(1).clone(), active, Y.shape[1], lams.clone())


def _gcv_lambdas(evals: torch.Tensor, R: torch.Tensor, Yc: torch.Tensor, n: int) -> torch.Tensor:
    """Per layer, argmin over the grid of GCV(lam) = (RSS/N) / (1 - df/N)^2, summed over all outputs.

    With Z^T Z = V diag(e) V^T and R = V^T Z^T Yc, the hat matrix has shrinkage f = e / (e + lam N) and
    RSS(lam) = ||Yc||^2 - sum_j |R_j|^2 (e_j + 2 lam N) / (e_j + lam N)^2 (no division by e, so e = 0 is fine).
    """
    total = float(((Yc - Yc.mean(0)) ** 2).sum())  # ||Y - ybar||^2
    q = (R.double() ** 2).sum(-1)  # (L, D)
    e = evals.double()
    best = []
    for i in range(e.shape[0]):
        errs = []
        for lam in RIDGE_GCV_GRID:
            ln = lam * n
            rss = total - float((q[i] * (e[i] + 2 * ln) / (e[i] + ln) ** 2).sum())
            df = float((e[i] / (e[i] + ln)).sum()) + 1.0  # +1: the intercept
            errs.append((rss / n) / max(1.0 - df / n, 1e-12) ** 2)
        best.append(RIDGE_GCV_GRID[int(np.argmin(errs))])
    return torch.tensor(best, dtype=torch.float32)


def fit_bce(X: np.ndarray | torch.Tensor, Y: torch.Tensor, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 0.0,
            batch_size: int = 512, seed: int = 0) -> LinearDecoders:
    """The paper's decoder: sigmoid(W E + b) trained with bag BCE, all layers in parallel (Adam).

    Exactly the full-vocabulary decoder (see the module docstring): the shared column is trained with
    weight 1, i.e. as any one of the identical never-seen columns.
    """
    X = torch.as_tensor(X, dtype=torch.float32)
    Z, mean, std = _standardize(X)
    L, n, d = Z.shape
    Yc, active = _compact_targets(Y)  # (N, A+1)
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(L, d, Yc.shape[1], requires_grad=True)
    prior = Yc.mean(0).clamp(1e-6, 1 - 1e-6)
    b = torch.log(prior / (1 - prior)).expand(L, 1, -1).clone().requires_grad_(True)  # start at the unigram base rate
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start: start + batch_size]
            logits = Z[:, idx] @ W + b  # (L, B, A+1)
            # the sum over layers of each layer's loss (layers do not share parameters)
            loss = recoverability_loss(logits.flatten(0, 1), Yc[idx].repeat(L, 1)) * L
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return LinearDecoders(mean, std, W.detach(), b.detach(), active, Y.shape[1])


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

