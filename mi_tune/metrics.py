"""Pure recoverability metrics: accuracy (precision@|bag|), cosine, and information in bits.

Information (DESIGN.md section 2). T is a token drawn uniformly from a sentence's bag (sentence uniform over
the evaluation set), E the sentence's pooled embedding. Only two quantities are called lower bounds:

- ``mi_variational_lb_bits`` = H(T) - CE, where CE = E[-log2 q(T|E)] is the held-out cross-entropy of ANY
  distribution q over the vocabulary fixed before the evaluation set is seen (Barber-Agakov: CE >= H(T|E)).
  Assumption: evaluation sentences are i.i.d. draws; H(T) and CE are sample means over them.
- ``mi_fano_list_lb_bits`` = H(T) - [H_b(Pe) + Pe log2(|V|-k) + (1-Pe) log2 k] (Fano for a list of k guesses,
  Pe = 1 - precision@|bag|). k = the largest bag of the set: a top-|bag| list is contained in the top-k_max
  list of the same scores, so padding only lowers Pe; the bound is monotone in Pe below 1 - k/|V|.
- ``mi_lb_bits`` = the larger of the two, clipped at 0.

H(T) is the plug-in entropy of the evaluation set's bag tokens (``bag_token_entropy_bits``). The plug-in
estimator is biased low (E[H_hat] <= H), which lowers the bound: we leave it uncorrected, on the safe side.
On one sample, H_hat is the smallest cross-entropy any E-independent q can reach, so a decoder that ignores
E (the no-feature prior) gets exactly 0 bits.

``mi_fano_uniform_bits`` is the paper's estimate: single-guess Fano with H(T) = log2|V|. log2|V| is an
upper bound on H(T), so this is NOT a lower bound on I(T;E); it is reported only to compare with the paper.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LN2 = math.log(2.0)
# q(t|E) ∝ prior(t) exp(tau (score_t(E) - intercept_t)): tau searched on the decoder's TRAINING sentences (0 = the prior)
TEMPERATURES = (0.0,) + tuple(2.0 ** (k / 2) for k in range(-4, 17))
PRIOR_FLOOR = 1e-2  # prior = (1 - floor) * training bag-token frequencies + floor * uniform: every id gets mass
CALIBRATION_SENTENCES = 256  # training sentences the tilt tau is chosen on


def binary_entropy_bits(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def fano_uniform_estimate_bits(accuracy: float, vocab_size: int) -> float:
    """The paper's estimate: log2|V| - H_b(Pe) - Pe log2(|V|-1), Pe = 1 - accuracy, clipped at 0.

    Uses H(T) = log2|V| (uniform tokens) and a single guess. NOT a lower bound on I(T;E): log2|V| over-states H(T).
    """
    pe = min(max(1.0 - accuracy, 0.0), 1.0)
    return max(math.log2(vocab_size) - binary_entropy_bits(pe) - pe * math.log2(vocab_size - 1), 0.0)


def fano_list_lower_bound_bits(accuracy: float, vocab_size: int, list_size: int, token_entropy_bits: float) -> float:
    """I(T;E) >= H(T) - H_b(Pe) - Pe log2(|V|-k) - (1-Pe) log2 k, Pe = 1 - accuracy of a k-guess list; clipped at 0.

    Valid for the accuracy of any list of at most k guesses that is a function of E (see the module docstring).
    """
    k = max(1, min(int(list_size), vocab_size - 1))
    pe = min(max(1.0 - accuracy, 0.0), 1.0)
    h_cond = binary_entropy_bits(pe) + pe * math.log2(vocab_size - k) + (1 - pe) * math.log2(k)
    return max(token_entropy_bits - h_cond, 0.0)


def variational_lower_bound_bits(token_entropy_bits: float, cross_entropy_bits: float) -> float:
    """I(T;E) >= H(T) - CE (CE: held-out cross-entropy of a fixed q(t|E), bits), clipped at 0."""
    return max(token_entropy_bits - cross_entropy_bits, 0.0)


def bag_token_distribution(bags: torch.Tensor) -> torch.Tensor:
    """(N, V) multi-hot bags -> (V,) distribution of T: a sentence uniformly, then a token uniformly from its bag."""
    Y = torch.as_tensor(bags).float()
    k = Y.sum(1, keepdim=True)  # (N, 1)
    keep = k[:, 0] > 0
    return (Y[keep] / k[keep]).mean(0)


def entropy_bits(p: torch.Tensor) -> float:
    p = torch.as_tensor(p, dtype=torch.float64)
    p = p[p > 0]
    p = p / p.sum()
    return float(-(p * torch.log2(p)).sum())


def bag_token_entropy_bits(bags: torch.Tensor) -> float:
    """Plug-in H(T) of a set's bags, T as in ``bag_token_distribution`` (biased low; see the module docstring)."""
    return entropy_bits(bag_token_distribution(bags))


def unigram_entropy_bits(token_counts: np.ndarray | torch.Tensor) -> float:
    """Entropy in bits of the empirical token distribution given counts per vocabulary id."""
    return entropy_bits(torch.as_tensor(token_counts, dtype=torch.float64))


def bag_token_distribution_of_seqs(seqs, vocab_size: int, exclude_ids=()) -> np.ndarray:
    """(V,) distribution of T from token id lists (no dense (N, V) matrix): as ``bag_token_distribution``."""
    ex = set(int(i) for i in exclude_ids)
    ids, weights = [], []
    for s in seqs:
        bag = {int(t) for t in s if 0 <= int(t) < vocab_size and int(t) not in ex}
        if bag:
            ids.extend(bag)
            weights.extend([1.0 / len(bag)] * len(bag))
    p = np.bincount(np.asarray(ids, dtype=np.int64), weights=np.asarray(weights), minlength=vocab_size)
    return p / max(p.sum(), 1e-12)


def smoothed_log_prior(p: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(V,) log of (1 - floor) p + floor / V: every id gets mass, so every held-out token has a finite cross-entropy."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log((1 - PRIOR_FLOOR) * p / p.sum().clamp(min=1e-12) + PRIOR_FLOOR / p.numel()).float()


def compact_log_q(C: torch.Tensor, b: torch.Tensor, tau: float, log_prior_a: torch.Tensor, log_mass_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log q(t|E) (nats) of the prior tilted by the decoder: q(t|E) ∝ prior(t) exp(tau (score_t(E) - b_t)).

    C: (B, A+1) compact scores (last column shared by the ids never seen in training), b: (1, A+1) the decoder's
    intercepts (its E-free scores), log_prior_a: (A,) log prior of the seen ids, log_mass_u: log of the prior mass
    of all unseen ids together. tau = 0 gives the prior itself. Returns ((B, A) log q of the seen ids, (B,) the tilt
    of every unseen id: log q(t) = log prior(t) + that).
    """
    T = tau * (C.float() - b)  # (B, A+1)
    parts = [log_prior_a + T[:, :-1]] + ([log_mass_u + T[:, -1:]] if math.isfinite(log_mass_u) else [])
    Z = torch.logsumexp(torch.cat(parts, 1), 1, keepdim=True)  # (B, 1)
    return log_prior_a + T[:, :-1] - Z, T[:, -1] - Z[:, 0]


def bag_cross_entropy_bits(log_q_a: torch.Tensor, ya: torch.Tensor, unseen_log_q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per sentence -E_T[log2 q(T|E)], T uniform over the bag.

    log_q_a, ya: (B, A) log q and bag of the seen ids; unseen_log_q: (B,) sum of log q over the bag ids never seen
    in the decoder's training; k: (B,) bag sizes. -> (B,), NaN for an empty bag.
    """
    nll = -((log_q_a * ya).sum(1) + unseen_log_q) / k.clamp(min=1) / LN2
    return nll.masked_fill(k == 0, float("nan"))


def calibrate(score_chunks, b: torch.Tensor, log_prior_a: torch.Tensor, log_mass_u: float) -> float:
    """The tilt tau of the grid (0 included: the prior alone) with the lowest mean bag cross-entropy on calibration data.

    ``score_chunks``: list of (C (B, A+1), ya (B, A)) of the decoder's TRAINING sentences, leave-one-out scores for
    ridge (never the evaluation set, so q is fixed before the evaluation set is seen and H(T) - CE stays a bound).
    """
    best, best_ce = 0.0, math.inf
    for tau in TEMPERATURES:
        ce = torch.cat([bag_cross_entropy_bits(compact_log_q(C, b, tau, log_prior_a, log_mass_u)[0], ya.float(),
                                               torch.zeros(len(ya)), ya.float().sum(1)) for C, ya in score_chunks])
        m = float(torch.nanmean(ce))
        if m < best_ce:
            best, best_ce = tau, m
    return best


def information(accuracy: float, ce_bits: float, token_entropy_bits: float, vocab_size: int, list_size: int) -> dict:
    """All information quantities of one decoder on one set (bits); names say which are bounds."""
    var = variational_lower_bound_bits(token_entropy_bits, ce_bits)
    fano = fano_list_lower_bound_bits(accuracy, vocab_size, list_size, token_entropy_bits)
    return {"mi_lb_bits": max(var, fano), "mi_variational_lb_bits": var, "mi_fano_list_lb_bits": fano,
            "mi_fano_uniform_bits": fano_uniform_estimate_bits(accuracy, vocab_size),
            "cross_entropy_bits": ce_bits, "token_entropy_bits": token_entropy_bits}


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
