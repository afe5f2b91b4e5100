"""Retrieval (BEIR layout): rank the corpus by cosine similarity to each query; nDCG@10, MRR@10 and
recall@100 against the qrels. A document is its title and text joined by a space (as BEIR and MTEB do).

Subsampling (``max_queries`` / ``max_corpus``) keeps every document judged for the kept queries and
adds seeded distractors up to ``max_corpus``: scores on a reduced corpus are higher than on the full
one, so they compare models with each other, not with published full-corpus numbers.
"""

from __future__ import annotations

import numpy as np

from ...errors import UserError, field_error
from ...stats import RESAMPLES, Interval, paired_mean_difference
from . import ITEMS_KEY, TaskSpec, local_path, read_file, read_hub, subsample


def _read_beir(spec: TaskSpec, data_root) -> tuple[dict, dict, dict]:
    split = spec.split or "test"
    if isinstance(spec.data, dict):  # Hub copy in the MTEB layout: configs corpus / queries / default (qrels)
        name = {k: v for k, v in spec.data.items() if k in ("hub", "revision")}
        corpus_rows = read_hub({**name, "config": "corpus", "split": "corpus"}, "data")
        query_rows = read_hub({**name, "config": "queries", "split": "queries"}, "data")
        qrel_rows = read_hub({**name, "config": "default", "split": split}, "data")
    else:
        root = local_path(spec.data, data_root, "data")
        qrels_path = root / "qrels" / f"{split}.tsv"
        for p in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
            if not p.is_file():
                raise UserError(field_error("data", str(root), "a BEIR folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv",
                                            f"{p.name} is missing; check the folder or the task's split ({split!r})"))
        corpus_rows, query_rows, qrel_rows = read_file(root / "corpus.jsonl", "data"), read_file(root / "queries.jsonl", "data"), read_file(qrels_path, "data")
    corpus = {str(r["_id"]): (str(r.get("title") or "") + " " + str(r.get("text") or "")).strip() for r in corpus_rows}
    queries = {str(r["_id"]): str(r["text"]) for r in query_rows}
    qrels: dict[str, dict[str, int]] = {}
    for r in qrel_rows:
        qrels.setdefault(str(r["query-id"]), {})[str(r["corpus-id"])] = int(float(r["score"]))
    return corpus, queries, qrels


def load(spec: TaskSpec, data_root, seed: int = 0) -> dict:
    corpus, queries, qrels = _read_beir(spec, data_root)
    qids = sorted(q for q in qrels if q in queries and any(v > 0 for v in qrels[q].values()))
    qids = [qids[i] for i in subsample(len(qids), spec.max_queries, seed)]
    dids = sorted(corpus)
    if spec.max_corpus is not None and spec.max_corpus < len(dids):
        judged = sorted({d for q in qids for d in qrels[q] if d in corpus})
        others = [d for d in dids if d not in set(judged)]
        extra = max(spec.max_corpus - len(judged), 0)
        dids = sorted(judged + [others[i] for i in subsample(len(others), extra, seed)])
    return {"query_ids": qids, "queries": [queries[q] for q in qids], "doc_ids": dids, "docs": [corpus[d] for d in dids],
            "qrels": {q: qrels[q] for q in qids}, "full_corpus": len(dids) == len(corpus)}


def per_query(query_emb: np.ndarray, doc_emb: np.ndarray, relevance: list[dict[int, int]]) -> dict[str, np.ndarray]:
    """(Q, D) queries, (N, D) documents, and per query {doc index: graded relevance} -> (Q,) nDCG@10, MRR@10, recall@100.

    nDCG uses linear gains and log2(rank + 1) discounts (trec_eval); the ideal ranking is built from all
    judged documents of the query. Ties in score keep corpus order.
    """
    q = query_emb / np.clip(np.linalg.norm(query_emb, axis=1, keepdims=True), 1e-12, None)
    d = doc_emb / np.clip(np.linalg.norm(doc_emb, axis=1, keepdims=True), 1e-12, None)
    discounts = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10
    ndcg, mrr, recall = [], [], []
    for start in range(0, len(q), 256):
        scores = q[start: start + 256] @ d.T  # (B, N)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :100]  # (B, 100)
        for row, rel in zip(top, relevance[start: start + 256]):
            gains = np.array([rel.get(int(i), 0) for i in row[:10]], dtype=np.float64)
            ideal = np.sort(np.array([g for g in rel.values() if g > 0], dtype=np.float64))[::-1][:10]
            idcg = (ideal * discounts[: len(ideal)]).sum()
            ndcg.append((gains * discounts[: len(gains)]).sum() / idcg if idcg > 0 else 0.0)
            hits = np.flatnonzero(gains > 0)
            mrr.append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
            relevant = {i for i, g in rel.items() if g > 0}
            recall.append(len(relevant & {int(i) for i in row}) / len(relevant) if relevant else 0.0)
    return {"ndcg_at_10": np.array(ndcg, dtype=np.float64), "mrr_at_10": np.array(mrr, dtype=np.float64),
            "recall_at_100": np.array(recall, dtype=np.float64)}


def metrics(query_emb: np.ndarray, doc_emb: np.ndarray, relevance: list[dict[int, int]]) -> dict[str, float]:
    """(Q, D) queries, (N, D) documents, per query {doc index: graded relevance} -> mean nDCG@10, MRR@10, recall@100 (see per_query)."""
    return {k: float(np.mean(v)) for k, v in per_query(query_emb, doc_emb, relevance).items()}


def run(data: dict, embed, seed: int = 0) -> dict:
    doc_index = {d: i for i, d in enumerate(data["doc_ids"])}
    relevance = [{doc_index[d]: g for d, g in data["qrels"][q].items() if d in doc_index} for q in data["query_ids"]]
    # Judged documents missing from the corpus still count in the ideal ranking (as trec_eval does).
    for rel, q in zip(relevance, data["query_ids"]):
        missing = [g for d, g in data["qrels"][q].items() if d not in doc_index and g > 0]
        for j, g in enumerate(missing):
            rel[-1 - j] = g  # negative keys never match a retrieved index
    q = embed(data["queries"], "queries")  # (Q, D)
    d = embed(data["docs"], "corpus")  # (N, D)
    each = per_query(q, d, relevance)  # (Q,) per metric
    out = {k: float(np.mean(v)) for k, v in each.items()}
    out.update(n_queries=len(data["queries"]), n_docs=len(data["docs"]), full_corpus=float(data["full_corpus"]))
    out[ITEMS_KEY] = {MAIN: each[MAIN]}
    return out


def interval(after: dict, before: dict, seed: int = 0, resamples: int = RESAMPLES) -> Interval:
    """Paired bootstrap of nDCG@10(after) − nDCG@10(before): the mean per-query difference."""
    return paired_mean_difference(after[MAIN], before[MAIN], resamples, seed)


MAIN = "ndcg_at_10"
ITEMS = "queries"
