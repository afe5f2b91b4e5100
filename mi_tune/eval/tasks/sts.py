"""Semantic textual similarity: cosine similarity of the two sentence embeddings against the gold
score, Spearman and Pearson correlation (the MTEB / SentEval protocol; scores need no rescaling
because both correlations are invariant to affine maps of the gold scores)."""

from __future__ import annotations

import numpy as np

from ...stats import RESAMPLES, Interval, paired_bootstrap
from . import ITEMS_KEY, TaskSpec, column, read_rows, subsample


def load(spec: TaskSpec, data_root, seed: int = 0) -> dict:
    rows = read_rows(spec.data, data_root, "data")
    s1 = column(rows, spec.text_field or "sentence1", "text_field", spec.data)
    s2 = column(rows, spec.text_pair_field or "sentence2", "text_pair_field", spec.data)
    gold = column(rows, spec.label_field or "score", "label_field", spec.data)
    keep = subsample(len(rows), spec.max_samples, seed)
    return {"sentences1": [str(s1[i]) for i in keep], "sentences2": [str(s2[i]) for i in keep],
            "scores": np.array([float(gold[i]) for i in keep])}


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) and (N, D) -> (N,)."""
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return (a * b).sum(1)


def correlations(sim: np.ndarray, gold) -> dict[str, float]:
    """(N,) similarities + (N,) gold scores -> Spearman, Pearson."""
    from scipy.stats import pearsonr, spearmanr

    return {"spearman": float(spearmanr(sim, gold).statistic), "pearson": float(pearsonr(sim, gold).statistic)}


def metrics(emb1: np.ndarray, emb2: np.ndarray, gold) -> dict[str, float]:
    """Embeddings of the first and second sentences (N, D) each + gold scores (N,) -> Spearman, Pearson."""
    return correlations(cosine_pairs(emb1.astype(np.float64), emb2.astype(np.float64)), gold)


def run(data: dict, embed, seed: int = 0) -> dict:
    # Embed each distinct sentence once (STS-B repeats sentences across pairs).
    unique = sorted(set(data["sentences1"]) | set(data["sentences2"]))
    index = {s: i for i, s in enumerate(unique)}
    emb = embed(unique, "sentences").astype(np.float64)  # (U, D)
    sim = cosine_pairs(emb[[index[s] for s in data["sentences1"]]], emb[[index[s] for s in data["sentences2"]]])  # (N,)
    gold = np.asarray(data["scores"], dtype=np.float64)  # (N,)
    return {**correlations(sim, gold), "n_pairs": len(gold), ITEMS_KEY: {"sim": sim, "gold": gold}}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """(N,) -> (N,) ranks 1..N, tied values sharing their mean rank (scipy.stats.rankdata's default)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse.reshape(-1)]


def centred_ranks(x: np.ndarray) -> np.ndarray:
    r = average_ranks(x)
    return r - r.mean()


def ranked_pearson(rx: np.ndarray, ry: np.ndarray) -> float:
    """Pearson correlation of two centred rank vectors (NaN when one is constant: a draw with no correlation, dropped)."""
    den = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / den) if den > 0 else float("nan")


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman as the Pearson correlation of average ranks: scipy's value without its per-call overhead (run on every draw)."""
    return ranked_pearson(centred_ranks(x), centred_ranks(y))


def interval(after: dict, before: dict, seed: int = 0, resamples: int = RESAMPLES) -> Interval:
    """Paired bootstrap of Spearman(after) − Spearman(before) over the pairs, both correlations recomputed on each draw."""
    if not np.array_equal(after["gold"], before["gold"]):
        raise ValueError("sts interval: the two sides were scored on different pairs")

    def difference(gold: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        rg = centred_ranks(gold)
        return ranked_pearson(centred_ranks(a), rg) - ranked_pearson(centred_ranks(b), rg)

    return paired_bootstrap(difference, after["gold"], after["sim"], before["sim"], resamples=resamples, seed=seed)


MAIN = "spearman"
ITEMS = "sentence pairs"
