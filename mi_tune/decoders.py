"""Fresh linear decoders fitted on frozen features: the measurement behind every before/after number.

- ``fit_ridge``: closed-form least squares onto the multi-hot bag (all layers in one batched eigendecomposition; the
  ridge strength can be chosen per layer by generalized cross-validation).
- ``fit_bce``: the paper's decoder, a linear layer trained with bag-of-tokens BCE (Adam, all layers in parallel).
Both work on features shaped (L, N, D) so a probe fits every layer together; targets are (N, V).
Features are z-scored per layer with training statistics (layers differ in scale by orders of magnitude).
Both fit on ``device`` (default: the features' own device; numpy features are on the CPU) and hand the decoders back
on the features' device, so ``device="cuda"`` fits a 7B model's decoders on its GPU while the caller keeps CPU tensors.

Full vocabulary, stored compactly. Every vocabulary id gets an output, but the ids that never occur in a
training bag all have the same target (always 0) and the same initialisation, so they end with the same
weights: exactly 0 for ridge, and identical trajectories under (per-element) Adam for BCE. We therefore
store one column per id seen in training (``active``, A of them) plus ONE shared column that stands for
every never-seen id, W: (L, D, A+1) instead of (L, D, V). ``scores`` expands it back to (N, V), so the
ranking, top-k and cosine are those of the full-vocabulary decoder. For SmolLM2 (V = 49,152, A ~ 10k on
1,400 sentences) this is what makes 31 decoders fit in memory.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .losses import recoverability_loss
from .metrics import (CALIBRATION_SENTENCES, bag_cross_entropy_bits, bag_token_entropy_bits, calibrate, compact_log_q, information,
                      smoothed_log_prior)
from .metrics import entropy_bits as _entropy_bits

# GCV grid for the ridge strength (multiplies N, on z-scored features): 1e-4 .. 1e2 in half decades.
RIDGE_GCV_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 5))


def bags_from_ids(seqs: list[list[int]], vocab_size: int, exclude_ids) -> torch.Tensor:
    """Multi-hot (N, V) float32 targets from token id lists, special/pad ids excluded (small vocabularies; else ``SparseBags``)."""
    return SparseBags.from_ids(seqs, vocab_size, exclude_ids).dense()


@dataclass(frozen=True)
class SparseBags:
    """(N, V) multi-hot bags stored as each row's sorted unique ids (CSR): memory N * |bag| instead of N * V.

    What the probe keeps per set: Gemma-3's 262,144-id vocabulary makes a dense bag matrix of 4,000 sentences 1 GB
    as uint8 and 4 GB as float32 (and the decoder, the control task and every scored set made copies); as ids it is
    ~1 MB. Everything here accepts these or a dense (N, V) tensor; results are the same (tests/test_probe.py).
    """

    indptr: torch.Tensor  # (N+1,) long: row i's ids are ids[indptr[i]:indptr[i+1]]
    ids: torch.Tensor  # (nnz,) long, sorted and unique within each row
    vocab_size: int

    @classmethod
    def from_ids(cls, seqs: list[list[int]], vocab_size: int, exclude_ids=()) -> "SparseBags":
        """As ``bags_from_ids`` (special/pad and out-of-range ids excluded), without the dense matrix."""
        exclude = set(int(i) for i in exclude_ids)
        rows = [sorted({int(t) for t in s if int(t) not in exclude and 0 <= int(t) < vocab_size}) for s in seqs]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)
        return cls(indptr, ids, int(vocab_size))

    @classmethod
    def from_dense(cls, Y: torch.Tensor) -> "SparseBags":
        rows, ids = torch.as_tensor(Y).cpu().nonzero(as_tuple=True)  # row-major: ids sorted within each row
        counts = torch.bincount(rows, minlength=Y.shape[0])
        return cls(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), ids.long(), int(Y.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.vocab_size)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, index: slice | torch.Tensor) -> "SparseBags":
        """Rows, as a tensor's ``Y[:n]`` / ``Y[perm]``."""
        return self.select(index)

    def sizes(self) -> torch.Tensor:
        """(N,) float: bag sizes."""
        return (self.indptr[1:] - self.indptr[:-1]).float()

    def entry_rows(self) -> torch.Tensor:
        """(nnz,) the row of each stored id."""
        return torch.repeat_interleave(torch.arange(len(self)), self.indptr[1:] - self.indptr[:-1])

    def select(self, index: slice | torch.Tensor) -> "SparseBags":
        """The bags of rows ``index`` (a slice or a (M,) long tensor), in that order."""
        index = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long).cpu()
        lengths = (self.indptr[1:] - self.indptr[:-1])[index]
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        offset = torch.arange(int(indptr[-1])) - torch.repeat_interleave(indptr[:-1], lengths)
        return SparseBags(indptr, self.ids[torch.repeat_interleave(self.indptr[:-1][index], lengths) + offset], self.vocab_size)

    def seen(self) -> torch.Tensor:
        """(A,) sorted ids that occur in at least one bag."""
        return torch.unique(self.ids)

    def columns(self, active: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, A) multi-hot of ``dtype``: the bags restricted to the sorted ids ``active``."""
        active = active.cpu()
        pos = torch.searchsorted(active, self.ids).clamp(max=max(len(active) - 1, 0))
        hit = active[pos] == self.ids if len(active) else torch.zeros_like(self.ids, dtype=torch.bool)
        out = torch.zeros(len(self), len(active), dtype=dtype)
        out[self.entry_rows()[hit], pos[hit]] = 1
        return out

    def dense(self) -> torch.Tensor:
        """(N, V) float32 multi-hot (only for small vocabularies: tests, the training head)."""
        out = torch.zeros(len(self), self.vocab_size)
        out[self.entry_rows(), self.ids] = 1.0
        return out

    def token_distribution(self) -> torch.Tensor:
        """(V,) distribution of T, as ``metrics.bag_token_distribution`` of the dense bags."""
        k = self.sizes()
        keep = int((k > 0).sum())
        w = (1.0 / k.clamp(min=1))[self.entry_rows()]
        return torch.zeros(self.vocab_size).index_add_(0, self.ids, w) / max(keep, 1)


def as_sparse_bags(Y) -> SparseBags:
    return Y if isinstance(Y, SparseBags) else SparseBags.from_dense(Y)


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

    def to(self, device: torch.device | str) -> LinearDecoders:
        """The same decoders with every tensor on ``device`` (the tensors themselves when already there)."""
        moved = {k: getattr(self, k).to(device) for k in ("mean", "std", "W", "b", "active")}
        return replace(self, **moved, lam=None if self.lam is None else self.lam.to(device))

    def compact_scores(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """(N, D) features of one layer -> (N, A+1) scores; the last column is every never-seen id."""
        X = torch.as_tensor(X, dtype=torch.float32, device=self.W.device)
        return ((X - self.mean[layer]) / self.std[layer]) @ self.W[layer] + self.b[layer]

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
    """(N, V) bags -> ((N, A+1) targets of the ids seen in training + an all-zero shared column, (A,) ids), on Y's device
    (``SparseBags``: on the CPU)."""
    if isinstance(Y, SparseBags):
        active = Y.seen()
        return torch.cat([Y.columns(active), torch.zeros(len(Y), 1)], dim=1), active
    active = (Y.sum(0) > 0).nonzero().flatten()  # (A,)
    Yc = torch.cat([Y[:, active], torch.zeros(Y.shape[0], 1, device=Y.device)], dim=1)  # (N, A+1)
    return Yc, active


def _devices(X, device: torch.device | str | None) -> tuple[torch.device, torch.device]:
    """(where to fit, where the decoders go back): ``device``, else the features' own device (numpy: the CPU)."""
    home = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
    return (home if device is None else torch.device(device)), home


def fit_ridge(X: np.ndarray | torch.Tensor, Y: torch.Tensor, lam: float | str | Sequence[float] = 1.0,
              device: torch.device | str | None = None) -> LinearDecoders:
    """X: (L, N, D), Y: (N, V). Solves (Z^T Z + lam N I) W = Z^T (Y - ybar) for every layer at once.

    ``lam``: a number (all layers), one number per layer, or "gcv": per layer, the value of
    ``RIDGE_GCV_GRID`` with the lowest generalized cross-validation error (closed form from the
    eigendecomposition of Z^T Z, so choosing costs no refits). The intercept is ybar, so never-seen
    ids score exactly 0. ``device``: where to fit (default: X's device); the decoders come back on X's device.
    """
    fit, home = _devices(X, device)
    X = torch.as_tensor(X, dtype=torch.float32, device=fit)
    Z, mean, std = _standardize(X)  # (L, N, D)
    L, n, d = Z.shape
    Yc, active = _compact_targets(Y)  # (N, A+1), on Y's device: only the sparse bags and their mean travel
    ybar = Yc.mean(0, keepdim=True).to(fit)  # (1, A+1)
    # Z^T (Y - ybar) through the sparse bag matrix: the dense product would cost N*D*A per layer.
    Yt = Yc.t().to_sparse().to(fit)  # (A+1, N)
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
    lams = lams.to(fit)
    W = vecs @ (R / (evals + lams.unsqueeze(1) * n).unsqueeze(-1))  # (L, D, A+1)
    return LinearDecoders(mean, std, W, ybar.expand(L, -1).unsqueeze(1).clone(), active, Y.shape[1], lams.clone()).to(home)


def _gcv_lambdas(evals: torch.Tensor, R: torch.Tensor, Yc: torch.Tensor, n: int) -> torch.Tensor:
    """Per layer, argmin over the grid of GCV(lam) = (RSS/N) / (1 - df/N)^2, summed over all outputs.

    With Z^T Z = V diag(e) V^T and R = V^T Z^T Yc, the hat matrix has shrinkage f = e / (e + lam N) and
    RSS(lam) = ||Yc||^2 - sum_j |R_j|^2 (e_j + 2 lam N) / (e_j + lam N)^2 (no division by e, so e = 0 is fine).
    """
    total = float(((Yc - Yc.mean(0)) ** 2).sum())  # ||Y - ybar||^2
    q = (R.double() ** 2).sum(-1).cpu()  # (L, D); the grid search below reads single numbers: on the host
    e = evals.double().cpu()
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
            batch_size: int = 512, seed: int = 0, device: torch.device | str | None = None) -> LinearDecoders:
    """The paper's decoder: sigmoid(W E + b) trained with bag BCE, all layers in parallel (Adam).

    Exactly the full-vocabulary decoder (see the module docstring): the shared column is trained with
    weight 1, i.e. as any one of the identical never-seen columns. ``device``: where to fit (default: X's
    device); the decoders come back on X's device. The batches are drawn on the CPU: the same on every device.
    """
    fit, home = _devices(X, device)
    X = torch.as_tensor(X, dtype=torch.float32, device=fit)
    Z, mean, std = _standardize(X)
    L, n, d = Z.shape
    Yc, active = _compact_targets(Y)  # (N, A+1)
    Yc = Yc.to(fit)
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(L, d, Yc.shape[1], device=fit, requires_grad=True)
    prior = Yc.mean(0).clamp(1e-6, 1 - 1e-6)
    b = torch.log(prior / (1 - prior)).expand(L, 1, -1).clone().requires_grad_(True)  # start at the unigram base rate
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(fit)
        for start in range(0, n, batch_size):
            idx = perm[start: start + batch_size]
            logits = Z[:, idx] @ W + b  # (L, B, A+1)
            # the sum over layers of each layer's loss (layers do not share parameters)
            loss = recoverability_loss(logits.flatten(0, 1), Yc[idx].repeat(L, 1)) * L
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return LinearDecoders(mean, std, W.detach(), b.detach(), active, Y.shape[1]).to(home)


def compact_bags(bags: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) bags (dense or ``SparseBags``) -> ((N, A) restricted to the seen ids, (N,) float count of the other bag ids)."""
    if isinstance(bags, SparseBags):
        ya = bags.columns(active, torch.uint8)  # as the probe's dense uint8 bags: 1 byte per (sentence, seen id)
        return ya, bags.sizes() - ya.sum(1, dtype=torch.float32)
    ya = bags[:, active]
    return ya, (bags.sum(1, dtype=torch.float32) - ya.sum(1, dtype=torch.float32))


def compact_metrics(C: torch.Tensor, ya: torch.Tensor, u: torch.Tensor, unseen: int, linear: bool):
    """Accuracy and cosine of full-vocabulary scores given in compact form, per sentence.

    C: (B, A+1) scores (last column: the ``unseen`` ids never seen in training, all tied); ya: (B, A) bag
    restricted to the A seen ids; u: (B,) bag ids among the unseen ones. Returns (acc (B,), cos (B,),
    idx (B, kmax) top active columns in decreasing score, n_active (B,) how many of them are in the top-k).
    The tied block of unseen ids counts its expected hits under a random choice among them (u/U per slot).
    Sentences with an empty bag get NaN.
    """
    Ca, s = C[:, :-1], C[:, -1]  # (B, A), (B,)
    k = ya.sum(1) + u  # (B,) bag sizes
    kmax = max(1, min(int(k.max()), Ca.shape[1]))
    vals, idx = Ca.topk(kmax, dim=1)  # (B, kmax)
    pos = torch.arange(kmax).unsqueeze(0)  # (1, kmax)
    above = ((vals > s.unsqueeze(1)) & (pos < k.unsqueeze(1))).sum(1)  # (B,) seen ids ranked above the tied block
    shared = torch.minimum(k - above, torch.full_like(k, float(unseen)))  # (B,) top-k slots taken by never-seen ids
    n_active = (k - shared).long()  # (B,)
    hits = (ya.gather(1, idx) * (pos < n_active.unsqueeze(1))).sum(1) + shared * u / max(unseen, 1)
    acc = hits / k
    P = C.clamp(0, 1) if linear else torch.sigmoid(C)  # (B, A+1) predicted probabilities
    Pa, ps = P[:, :-1], P[:, -1]
    dot = (Pa * ya).sum(1) + u * ps
    norm = torch.sqrt((Pa ** 2).sum(1) + unseen * ps ** 2) * torch.sqrt(k)
    cos = dot / norm.clamp(min=1e-12)
    empty = k == 0
    return acc.masked_fill(empty, float("nan")), cos.masked_fill(empty, float("nan")), idx, n_active


ROW_CHUNK = 512  # sentences scored at once: (512, A+1) compact scores, ~20 MB for A = 10k


@dataclass
class BagSet:
    """The bags of one set restricted to a decoder's seen ids, plus what the information metrics need."""

    ya: torch.Tensor  # (N, A) bag on the seen ids
    u: torch.Tensor  # (N,) how many bag ids were never seen in training
    unseen_rows: torch.Tensor  # (M,) sentence of each (sentence, never-seen bag id) pair
    unseen_ids: torch.Tensor  # (M,) its vocabulary id
    entropy_bits: float  # plug-in H(T) (metrics.bag_token_entropy_bits), of these bags or of a larger sample
    max_bag: int  # the list size of the list-Fano bound

    @classmethod
    def of(cls, bags: torch.Tensor, active: torch.Tensor, entropy_bits: float | None = None) -> "BagSet":
        """``entropy_bits``: H(T) estimated on a larger sample of the same distribution (less biased); else on ``bags``."""
        ya, u = compact_bags(bags, active)
        k = ya.sum(1, dtype=torch.float32) + u
        if isinstance(bags, SparseBags):
            other = ~torch.isin(bags.ids, active.cpu())
            rows, ids = bags.entry_rows()[other], bags.ids[other]
            h = _entropy_bits(bags.token_distribution()) if entropy_bits is None else float(entropy_bits)
        else:
            rest = bags.bool().clone()
            rest[:, active] = False
            rows, ids = rest.nonzero(as_tuple=True)
            h = bag_token_entropy_bits(bags) if entropy_bits is None else float(entropy_bits)
        return cls(ya, u, rows, ids, h, int(k.max()) if k.numel() else 0)


def ridge_loo_scores(dec: LinearDecoders, j: int, X_all: torch.Tensor, C: torch.Tensor, ya: torch.Tensor) -> torch.Tensor:
    """Leave-one-out compact scores of the first len(C) training sentences of ridge decoder ``j``.

    With leverage h_i = z_i (Z^T Z + lam N I)^-1 z_i (Z: all N standardised training features), the prediction for
    sentence i from a fit without it is b + (C_i - b - h_i (y_i - b)) / (1 - h_i) (closed form; the intercept's own
    1/N leverage is ignored). These are honest out-of-sample scores to calibrate q(t|E) on.
    """
    Z = (X_all.float() - dec.mean[j]) / dec.std[j]  # (N, D)
    n_all = Z.shape[0]
    G = Z.T @ Z + float(dec.lam[j]) * n_all * torch.eye(Z.shape[1], device=Z.device)  # (D, D)
    Zc = Z[: len(C)]
    h = (Zc * torch.linalg.solve(G, Zc.T).T).sum(1, keepdim=True).clamp(max=0.99)  # (n, 1)
    Yc = torch.cat([ya.float(), torch.zeros(len(C), 1, device=ya.device)], 1)  # (n, A+1): the shared column's target is 0
    b = dec.b[j]  # (1, A+1)
    return b + (C - b - h * (Yc - b)) / (1 - h)


def accuracy_per_sentence(dec: LinearDecoders, j: int, X, bs: BagSet, linear: bool) -> torch.Tensor:
    """(N,) recoverability accuracy of decoder layer ``j`` on features X (N, D), nothing else (no calibration of q, no
    cross-entropy): what the control task reports. Equals ``InformationProbe(...).per_sentence(X, bs)["acc"]``."""
    unseen = dec.vocab_size - len(dec.active)
    return torch.cat([compact_metrics(dec.compact_scores(torch.as_tensor(X[s: s + ROW_CHUNK]), j), bs.ya[s: s + ROW_CHUNK].float(),
                                      bs.u[s: s + ROW_CHUNK], unseen, linear)[0] for s in range(0, len(bs.u), ROW_CHUNK)])


class InformationProbe:
    """Scores one decoder layer on sets and turns them into per-sentence accuracy, cosine and cross-entropy.

    q(t|E) ∝ prior(t) exp(tau (score_t(E) - intercept_t)): the prior (a smoothed bag-token distribution of training
    text; ``prior``: (V,), default: the decoder's training bags) tilted by what the decoder reads from E. tau (0: the
    prior alone) is picked (metrics.calibrate) on the decoder's training sentences, leave-one-out for ridge, before
    any evaluation set is scored.
    """

    def __init__(self, dec: LinearDecoders, j: int, X_train, train: BagSet, linear: bool, prior: np.ndarray | None = None):
        self.dec, self.j, self.linear = dec, j, linear
        self.unseen = dec.vocab_size - len(dec.active)
        if prior is None:
            prior = torch.zeros(dec.vocab_size, dtype=torch.float64)
            k = train.ya.sum(1, keepdim=True, dtype=torch.float32).clamp(min=1)
            prior[dec.active] = (train.ya.float() / k).mean(0).double()
        self.log_prior = smoothed_log_prior(prior)  # (V,)
        self.log_prior_a = self.log_prior[dec.active]  # (A,)
        mass_u = 1.0 - float(self.log_prior_a.double().exp().sum())  # prior mass of every id never seen in training
        self.log_mass_u = math.log(mass_u) if mass_u > 0 and self.unseen else -math.inf
        self.b = dec.b[j]  # (1, A+1) the decoder's E-free scores
        n = min(CALIBRATION_SENTENCES, len(train.u))
        C = dec.compact_scores(torch.as_tensor(X_train[:n]), j)  # (n, A+1)
        if linear and dec.lam is not None:  # ridge: calibrate on leave-one-out scores, not on the in-sample fit
            C = ridge_loo_scores(dec, j, torch.as_tensor(X_train), C, train.ya[:n])
        chunks = [(C[s: s + ROW_CHUNK], train.ya[s: min(s + ROW_CHUNK, n)]) for s in range(0, n, ROW_CHUNK)]
        self.tau = calibrate(chunks, self.b, self.log_prior_a, self.log_mass_u)

    def per_sentence(self, X, bs: BagSet, keep_top: bool = False) -> dict:
        """{"acc", "cos", "ce_bits", "ce_prior_bits"}: (N,) each (``ce_prior_bits``: q's prior alone, i.e. without E); with
        ``keep_top`` also the top ids per sentence for BLEU/ROUGE."""
        out = {"acc": [], "cos": [], "ce_bits": [], "ce_prior_bits": [], "idx": [], "n_active": []}
        for s in range(0, len(bs.u), ROW_CHUNK):
            C = self.dec.compact_scores(torch.as_tensor(X[s: s + ROW_CHUNK]), self.j)  # (B, A+1)
            ya, u = bs.ya[s: s + ROW_CHUNK].float(), bs.u[s: s + ROW_CHUNK]
            acc, cos, idx, n_active = compact_metrics(C, ya, u, self.unseen, self.linear)
            la, tilt_u = compact_log_q(C, self.b, self.tau, self.log_prior_a, self.log_mass_u)
            pick = (bs.unseen_rows >= s) & (bs.unseen_rows < s + len(u))
            rows, ids = bs.unseen_rows[pick] - s, bs.unseen_ids[pick]
            prior_u = torch.zeros(len(u)).index_add_(0, rows, self.log_prior[ids])  # (B,) sum of log prior of the unseen bag ids
            ce = bag_cross_entropy_bits(la, ya, prior_u + u * tilt_u, ya.sum(1) + u)
            ce0 = bag_cross_entropy_bits(self.log_prior_a.expand_as(ya), ya, prior_u, ya.sum(1) + u)  # the prior alone: q without E
            out["acc"].append(acc), out["cos"].append(cos), out["ce_bits"].append(ce), out["ce_prior_bits"].append(ce0)
            if keep_top:
                out["idx"].append(idx), out["n_active"].append(n_active)
        res = {k: torch.cat(out[k]) for k in ("acc", "cos", "ce_bits", "ce_prior_bits")}
        if keep_top:
            res["top"] = list(zip(out["idx"], out["n_active"]))
        return res

    def summary(self, per: dict, bs: BagSet) -> dict:
        acc = float(torch.nanmean(per["acc"]))
        return {"recoverability_acc": acc, "cosine": float(torch.nanmean(per["cos"])),
                **information(acc, float(torch.nanmean(per["ce_bits"])), bs.entropy_bits, self.dec.vocab_size, bs.max_bag),
                # bits per token q(t|E) saves over its own prior: usable information of this decoder family, NOT a bound on I(T;E)
                "ce_gain_over_prior_bits": float(torch.nanmean(per["ce_prior_bits"] - per["ce_bits"])),
                "q_tilt": self.tau}


def prior_per_sentence(train_ya: torch.Tensor, bs: BagSet, vocab_size: int) -> torch.Tensor:
    """(N,) accuracy of the no-feature baseline: every sentence gets the same ranking, the ids' training bag frequency.

    Any decoder's intercept starts from this ranking, so a decoder's accuracy means something only above it.
    """
    A = train_ya.shape[1]
    scores = torch.cat([train_ya.sum(0, dtype=torch.float32) / max(len(train_ya), 1), torch.zeros(1)])  # (A+1,): never-seen ids have frequency 0
    return torch.cat([compact_metrics(scores.expand(len(bs.u[i: i + ROW_CHUNK]), -1), bs.ya[i: i + ROW_CHUNK].float(),
                                      bs.u[i: i + ROW_CHUNK], vocab_size - A, linear=True)[0] for i in range(0, len(bs.u), ROW_CHUNK)])
