"""Clustering: k-means with k = number of classes on L2-normalised embeddings, over several seeds.
NMI, ARI and V-measure against the labels, mean and standard deviation over the seeds."""

from __future__ import annotations

import numpy as np

from . import TaskSpec, column, encode_labels, read_rows, subsample


def load(spec: TaskSpec, data_root, seed: int = 0) -> dict:
    rows = read_rows(spec.data, data_root, "data")
    labels = column(rows, spec.label_field or "label", "label_field", spec.data)
    texts = column(rows, spec.text_field or "text", "text_field", spec.data)
    keep = subsample(len(rows), spec.max_samples, seed, labels)
    (y,), classes = encode_labels([labels[i] for i in keep])
    return {"texts": [str(texts[i]) for i in keep], "labels": y, "classes": classes}


def metrics(embeddings: np.ndarray, labels, seeds=(0, 1, 2, 3, 4)) -> dict[str, float]:
    """(N, D) embeddings + integer labels -> {nmi,ari,v_measure}_{mean,std} over k-means seeds."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, v_measure_score

    labels = np.asarray(labels)
    k = len(np.unique(labels))
    # Our default: cosine geometry (unit vectors), the same similarity the STS and retrieval tasks use.
    x = embeddings.astype(np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    scores = {"nmi": [], "ari": [], "v_measure": []}
    for seed in seeds:
        pred = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x)  # one init per seed: the spread is seed spread
        scores["nmi"].append(normalized_mutual_info_score(labels, pred))
        scores["ari"].append(adjusted_rand_score(labels, pred))
        scores["v_measure"].append(v_measure_score(labels, pred))
    out = {}
    for name, vals in scores.items():
        out[f"{name}_mean"] = float(np.mean(vals))
        out[f"{name}_std"] = float(np.std(vals))
    return out


def run(data: dict, embed, seed: int = 0, n_seeds: int = 5) -> dict[str, float]:
    emb = embed(data["texts"], "texts")  # (N, D)
    out = metrics(emb, data["labels"], seeds=tuple(range(seed, seed + n_seeds)))
    out.update(n_samples=len(data["texts"]), n_classes=len(data["classes"]), n_seeds=n_seeds)
    return out


MAIN = "nmi_mean"
