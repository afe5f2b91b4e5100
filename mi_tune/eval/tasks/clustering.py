"""Clustering: k-means with k = number of classes on L2-normalised embeddings, over several seeds.
NMI, ARI and V-measure against the labels, mean and standard deviation over the seeds."""

from __future__ import annotations

import warnings

import numpy as np

from ...stats import Interval, paired_bootstrap, resample_indices
from . import ITEMS_KEY, TaskSpec, column, encode_labels, read_rows, subsample

RESAMPLES = 200  # default bootstrap draws for clustering (not stats.RESAMPLES): each draw refits k-means once per seed and model


def load(spec: TaskSpec, data_root, seed: int = 0) -> dict:
    rows = read_rows(spec.data, data_root, "data")
    labels = column(rows, spec.label_field or "label", "label_field", spec.data)
    texts = column(rows, spec.text_field or "text", "text_field", spec.data)
    keep = subsample(len(rows), spec.max_samples, seed, labels)
    (y,), classes = encode_labels([labels[i] for i in keep])
    return {"texts": [str(texts[i]) for i in keep], "labels": y, "classes": classes}


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float64 rows of norm 1. Our default: cosine geometry, the similarity the STS and retrieval tasks use."""
    x = embeddings.astype(np.float64)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def seed_scores(x: np.ndarray, labels: np.ndarray, k: int, seeds, names=("nmi", "ari", "v_measure")) -> dict[str, list[float]]:
    """k-means (k clusters) on unit rows (N, D), once per seed -> {score name: one value per seed}."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, v_measure_score

    score = {"nmi": normalized_mutual_info_score, "ari": adjusted_rand_score, "v_measure": v_measure_score}
    out = {name: [] for name in names}
    for seed in seeds:
        pred = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x)  # one init per seed: the spread is seed spread
        for name in names:
            out[name].append(score[name](labels, pred))
    return out


def metrics(embeddings: np.ndarray, labels, seeds=(0, 1, 2, 3, 4)) -> dict[str, float]:
    """(N, D) embeddings + integer labels -> {nmi,ari,v_measure}_{mean,std} over k-means seeds."""
    labels = np.asarray(labels)
    out = {}
    for name, vals in seed_scores(unit_rows(embeddings), labels, len(np.unique(labels)), seeds).items():
        out[f"{name}_mean"] = float(np.mean(vals))
        out[f"{name}_std"] = float(np.std(vals))
    return out


def resampled(embeddings: np.ndarray, labels, seeds, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples,) MAIN on each bootstrap draw of the items, ``stats.resample_indices(N, resamples, seed)`` (the draws
    ``paired_bootstrap`` makes): k-means refit on the drawn rows with the same seeds and k, mean over the seeds."""
    x, labels = unit_rows(embeddings), np.asarray(labels)
    k, name = len(np.unique(labels)), MAIN.removesuffix("_mean")
    with warnings.catch_warnings():  # a draw with fewer distinct rows than k warns; its score still counts
        warnings.simplefilter("ignore")
        return np.array([np.mean(seed_scores(x[i], labels[i], k, seeds, (name,))[name]) for i in resample_indices(len(labels), resamples, seed)])


def run(data: dict, embed, seed: int = 0, n_seeds: int = 5, resamples: int = 0) -> dict:
    """Scores over k-means seeds seed..seed+n_seeds-1; with resamples > 0, also MAIN on that many bootstrap draws (for ``interval``)."""
    emb = embed(data["texts"], "texts")  # (N, D)
    seeds = tuple(range(seed, seed + n_seeds))
    out = metrics(emb, data["labels"], seeds=seeds)
    out.update(n_samples=len(data["texts"]), n_classes=len(data["classes"]), n_seeds=n_seeds)
    # The embeddings are not kept: every model is refit on the same draws here, once, and ``interval`` pairs the results.
    out[ITEMS_KEY] = {MAIN: out[MAIN], "n": len(data["texts"]), "seed": seed,
                      "resampled": resampled(emb, data["labels"], seeds, resamples, seed) if resamples else np.zeros(0)}  # (resamples,)
    return out


def interval(after: dict, before: dict, seed: int = 0, resamples: int = RESAMPLES) -> Interval:
    """Paired bootstrap of NMI(after) − NMI(before) over the items, from the draws ``run`` refit k-means on."""
    n = after["n"]
    for side in (after, before):
        if side["n"] != n or side["seed"] != seed or len(side["resampled"]) != resamples:
            raise ValueError(f"clustering interval: run() drew {len(side['resampled'])} resamples of {side['n']} items with seed {side['seed']}; "
                             f"asked for {resamples} of {n} with seed {seed}")
    # paired_bootstrap draws the same item indices run() did; look each draw up instead of refitting k-means.
    draw = {i.tobytes(): r for r, i in enumerate(resample_indices(n, resamples, seed))}
    full = np.arange(n)

    def difference(i: np.ndarray) -> float:
        if np.array_equal(i, full):  # the full sample (a draw equal to it scores the same)
            return after[MAIN] - before[MAIN]
        r = draw[i.tobytes()]
        return float(after["resampled"][r] - before["resampled"][r])

    return paired_bootstrap(difference, full, resamples=resamples, seed=seed)


MAIN = "nmi_mean"
ITEMS = "items (k-means refit on each draw with the same seeds)"
