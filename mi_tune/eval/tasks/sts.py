"""Semantic textual similarity: cosine similarity of the two sentence embeddings against the gold
score, Spearman and Pearson correlation (the MTEB / SentEval protocol; scores need no rescaling
because both correlations are invariant to affine maps of the gold scores)."""

from __future__ import annotations

import numpy as np

from . import TaskSpec, column, read_rows, subsample


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


def metrics(emb1: np.ndarray, emb2: np.ndarray, gold) -> dict[str, float]:
    """Embeddings of the first and second sentences (N, D) each + gold scores (N,) -> Spearman, Pearson."""
    from scipy.stats import pearsonr, spearmanr

    sim = cosine_pairs(emb1.astype(np.float64), emb2.astype(np.float64))
    return {"spearman": float(spearmanr(sim, gold).statistic), "pearson": float(pearsonr(sim, gold).statistic)}


def run(data: dict, embed, seed: int = 0) -> dict[str, float]:
    # Embed each distinct sentence once (STS-B repeats sentences across pairs).
    unique = sorted(set(data["sentences1"]) | set(data["sentences2"]))
    index = {s: i for i, s in enumerate(unique)}
    emb = embed(unique, "sentences")  # (U, D)
    e1 = emb[[index[s] for s in data["sentences1"]]]
    e2 = emb[[index[s] for s in data["sentences2"]]]
    return {**metrics(e1, e2, data["scores"]), "n_pairs": len(data["scores"])}


MAIN = "spearman"
