"""Classification: logistic regression on frozen embeddings, trained on the data set's own train split,
scored on its test split. Accuracy and macro-F1."""

from __future__ import annotations

import numpy as np

from ...stats import RESAMPLES, Interval, paired_mean_difference
from . import ITEMS_KEY, TaskSpec, column, encode_labels, read_rows, subsample


def load(spec: TaskSpec, data_root, seed: int = 0) -> dict:
    text_field, label_field = spec.text_field or "text", spec.label_field or "label"
    out = {}
    for split, source, cap in (("train", spec.train, spec.max_train), ("test", spec.test, spec.max_test)):
        rows = read_rows(source, data_root, f"{split}")
        labels = column(rows, label_field, "label_field", source)
        keep = subsample(len(rows), cap, seed, labels)
        texts = column(rows, text_field, "text_field", source)
        out[f"{split}_texts"] = [str(texts[i]) for i in keep]
        out[f"{split}_labels"] = [labels[i] for i in keep]
    (out["train_labels"], out["test_labels"]), out["classes"] = encode_labels(out["train_labels"], out["test_labels"])
    return out


def predict(train_emb: np.ndarray, train_labels, test_emb: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) train embeddings + integer labels, (M, D) test embeddings -> (M,) predicted labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Our default: standardise features first. Decoder hidden states carry a few dimensions with
    # huge magnitudes ("massive activations") that otherwise dominate the L2 penalty and the solver.
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0, random_state=seed))
    clf.fit(train_emb, train_labels)
    return clf.predict(test_emb)


def scores(test_labels, pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(test_labels, pred)), "macro_f1": float(f1_score(test_labels, pred, average="macro"))}


def metrics(train_emb: np.ndarray, train_labels, test_emb: np.ndarray, test_labels, seed: int = 0) -> dict[str, float]:
    """(N, D) train/test embeddings + integer labels -> accuracy, macro-F1 on the test split."""
    return scores(test_labels, predict(train_emb, train_labels, test_emb, seed))


def run(data: dict, embed, seed: int = 0) -> dict:
    train = embed(data["train_texts"], "train")  # (N_train, D)
    test = embed(data["test_texts"], "test")  # (N_test, D)
    pred = predict(train, data["train_labels"], test, seed)  # (N_test,)
    out = scores(data["test_labels"], pred)
    out.update(n_train=len(data["train_texts"]), n_test=len(data["test_texts"]), n_classes=len(data["classes"]))
    out[ITEMS_KEY] = {"correct": (pred == np.asarray(data["test_labels"])).astype(np.float64)}  # (N_test,) 1 = right
    return out


def interval(after: dict, before: dict, seed: int = 0, resamples: int = RESAMPLES) -> Interval:
    """Paired bootstrap of accuracy(after) − accuracy(before): the mean per-sentence difference in correctness."""
    return paired_mean_difference(after["correct"], before["correct"], resamples, seed)


MAIN = "accuracy"
ITEMS = "test sentences"
