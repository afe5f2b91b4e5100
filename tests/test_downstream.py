"""Downstream evaluation: metrics on constructed cases, suites, the runner end to end (tiny model),
MLflow attachment, the MTEB wrapper on local data (no network) and the sentence-transformers export."""

import json
from pathlib import Path

import numpy as np
import pytest

from mi_tune.errors import UserError
from mi_tune.eval.downstream import OUTPUT_FILES, evaluate, load_suite
from mi_tune.eval.tasks import TaskSpec, classification, clustering, retrieval, subsample, sts

from .conftest import MINILM, ROOT, SHARED_DATA, TINY, run_cli

# ---------------------------------------------------------------------------------------------
# metrics on constructed cases


def blobs(n_per=40, k=4, d=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 5
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_clustering_separable_clusters_give_nmi_1():
    x, y = blobs()
    m = clustering.metrics(x, y, seeds=(0, 1, 2))
    assert m["nmi_mean"] == pytest.approx(1.0, abs=1e-9)
    assert m["ari_mean"] == pytest.approx(1.0, abs=1e-9)
    assert m["v_measure_mean"] == pytest.approx(1.0, abs=1e-9)
    assert m["nmi_std"] == pytest.approx(0.0, abs=1e-9)


def test_clustering_random_labels_give_nmi_near_0():
    x, _ = blobs()
    y = np.random.default_rng(1).integers(0, 4, len(x))
    assert clustering.metrics(x, y, seeds=(0,))["ari_mean"] < 0.1


def test_sts_identical_pairs_give_top_correlation():
    # Pair i: the second embedding is the first rotated by an angle that shrinks as the gold score
    # grows; gold 5 pairs are identical (cosine 1). Cosine is then a strictly increasing function of gold.
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, size=60)
    gold[0] = 5.0  # one identical pair (no ties in gold: tied ranks would keep Spearman a hair below 1)
    theta = (5 - gold) / 5 * (np.pi / 2)
    base = rng.normal(size=(60, 8))
    ortho = rng.normal(size=(60, 8))
    ortho -= (ortho * base).sum(1, keepdims=True) / (base * base).sum(1, keepdims=True) * base  # ⟂ base
    b, o = base / np.linalg.norm(base, axis=1, keepdims=True), ortho / np.linalg.norm(ortho, axis=1, keepdims=True)
    second = np.cos(theta)[:, None] * b + np.sin(theta)[:, None] * o
    m = sts.metrics(base, second, gold)
    assert m["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert m["pearson"] > 0.95
    assert sts.cosine_pairs(base[:1], second[:1]) == pytest.approx(np.ones(1))
    assert sts.metrics(base, second, -gold)["spearman"] == pytest.approx(-1.0, abs=1e-12)


def test_retrieval_identical_document_gives_ndcg_1():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 16))
    queries = docs[[3, 17, 42]].copy()  # each query is identical to its relevant document
    m = retrieval.metrics(queries, docs, [{3: 1}, {17: 1}, {42: 1}])
    assert m == {"ndcg_at_10": 1.0, "mrr_at_10": 1.0, "recall_at_100": 1.0}


def test_retrieval_hand_computed_ranks():
    docs = np.eye(4)
    q = np.array([[0.9, 1.0, 0.0, 0.0]])  # ranking: doc 1, doc 0, ...
    m = retrieval.metrics(q, docs, [{0: 1}])
    assert m["ndcg_at_10"] == pytest.approx(1 / np.log2(3))
    assert m["mrr_at_10"] == pytest.approx(0.5)
    # two relevant documents, one at rank 1 and one never retrieved in the top 10 (judged but missing: key -1)
    m = retrieval.metrics(q, docs, [{1: 1, -1: 1}])
    assert m["ndcg_at_10"] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert m["recall_at_100"] == pytest.approx(0.5)


def test_retrieval_matches_trec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(30, 8)), rng.normal(size=(200, 8))
    rel = [{int(j): int(rng.integers(1, 3)) for j in rng.choice(200, size=rng.integers(1, 4), replace=False)} for _ in range(30)]
    ours = retrieval.metrics(q, d, rel)
    qn, dn = q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
    run = {f"q{i}": {f"d{j}": float(s) for j, s in enumerate(row)} for i, row in enumerate(qn @ dn.T)}
    qrels = {f"q{i}": {f"d{j}": g for j, g in r.items()} for i, r in enumerate(rel)}
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert ours["ndcg_at_10"] == pytest.approx(np.mean([r["ndcg_cut_10"] for r in res.values()]), abs=1e-9)
    assert ours["recall_at_100"] == pytest.approx(np.mean([r["recall_100"] for r in res.values()]), abs=1e-9)


def test_classification_separable_classes():
    x, y = blobs(n_per=30, k=3)
    m = classification.metrics(x[::2], y[::2], x[1::2], y[1::2])
    assert m == {"accuracy": 1.0, "macro_f1": 1.0}


def test_subsample_is_seeded_and_stratified():
    labels = np.array([0] * 300 + [1] * 100)
    idx = subsample(len(labels), 40, seed=3, labels=labels)
    assert len(idx) == 40 and list(idx) == sorted(idx)
    assert (labels[idx] == 0).sum() == 30 and (labels[idx] == 1).sum() == 10
    assert list(idx) == list(subsample(len(labels), 40, seed=3, labels=labels))
    assert list(subsample(10, None, 0)) == list(range(10))


# ---------------------------------------------------------------------------------------------
# paired bootstrap intervals of the main metric's differences


def numpy_percentile_interval(per_draw, n, resamples, seed):
    """Hand-made reference: draw r = default_rng(seed).integers(0, n, (resamples, n))[r]; 2.5/97.5% percentiles."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    vals = np.array([per_draw(i) for i in idx])
    vals = vals[np.isfinite(vals)]
    return np.quantile(vals, [0.025, 0.975])


def spearman_by_hand(x, y):
    from scipy.stats import rankdata

    return np.corrcoef(rankdata(x), rankdata(y))[0, 1]  # Spearman = Pearson of the average ranks


def two_columns(family, seed=0, **kw):
    """The items of a small task scored by two different models (fake embeddings), through the family's run()."""
    rng = np.random.default_rng(seed)
    if family == "classification":
        x, y = blobs(n_per=20, k=3, spread=3.0)
        data = {"train_texts": [f"tr{i}" for i in range(0, 60, 2)], "train_labels": y[::2],
                "test_texts": [f"te{i}" for i in range(1, 60, 2)], "test_labels": y[1::2], "classes": [0, 1, 2]}
        noisy = x + 4 * rng.normal(size=x.shape)
        embs = [{"train": e[::2], "test": e[1::2]} for e in (x, noisy)]
        return [classification.run(data, lambda t, role, e=e: e[role]) for e in embs]
    if family == "sts":
        gold = rng.uniform(0, 5, size=40)
        a = rng.normal(size=(40, 8))
        data = {"sentences1": [f"a{i}" for i in range(40)], "sentences2": [f"b{i}" for i in range(40)], "scores": gold}
        runs = []
        for noise in (0.3, 1.5):
            b = a + (5 - gold)[:, None] / 5 * rng.normal(size=a.shape) + noise * rng.normal(size=a.shape)
            table = dict(zip(data["sentences1"] + data["sentences2"], np.concatenate([a, b])))
            runs.append(sts.run(data, lambda texts, role, t=table: np.array([t[s] for s in texts])))
        return runs
    if family == "retrieval":
        docs = rng.normal(size=(30, 8))
        data = {"query_ids": [f"q{i}" for i in range(12)], "queries": [f"q{i}" for i in range(12)],
                "doc_ids": [f"d{i}" for i in range(30)], "docs": [f"d{i}" for i in range(30)],
                "qrels": {f"q{i}": {f"d{i}": 1, f"d{i + 12}": 2} for i in range(12)}, "full_corpus": True}
        runs = []
        for noise in (0.5, 2.0):
            q = docs[:12] + docs[12:24] + noise * rng.normal(size=(12, 8))
            runs.append(retrieval.run(data, lambda texts, role, q=q: q if role == "queries" else docs))
        return runs
    x, y = blobs(n_per=10, k=3, spread=2.0)
    data = {"texts": [str(i) for i in range(30)], "labels": y, "classes": [0, 1, 2]}
    return [clustering.run(data, lambda t, role, e=e: e, 0, 2, **kw) for e in (x, x + 3 * rng.normal(size=x.shape))]


def test_classification_and_retrieval_intervals_equal_a_numpy_recomputation():
    for fam, key, n in ((classification, "correct", 30), (retrieval, "ndcg_at_10", 12)):
        after, before = two_columns(fam.__name__.split(".")[-1])
        a, b = after["items"][key], before["items"][key]
        assert a.shape == b.shape == (n,)
        assert a.mean() == pytest.approx(after[fam.MAIN]) and b.mean() == pytest.approx(before[fam.MAIN])  # the items make MAIN
        iv = fam.interval(after["items"], before["items"], seed=3, resamples=500)
        lo, hi = numpy_percentile_interval(lambda i: a[i].mean() - b[i].mean(), n, 500, 3)
        assert (iv.low, iv.high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
        assert iv.estimate == pytest.approx(after[fam.MAIN] - before[fam.MAIN], abs=1e-12) and (iv.n, iv.resamples) == (n, 500)


def test_sts_interval_recomputes_spearman_on_each_draw():
    after, before = two_columns("sts")
    it_a, it_b = after["items"], before["items"]
    assert spearman_by_hand(it_a["sim"], it_a["gold"]) == pytest.approx(after["spearman"], abs=1e-12)
    tied = np.round(it_a["gold"])  # ties: average ranks, as scipy
    assert sts.rank_correlation(it_a["sim"][:30].round(1), tied[:30]) == pytest.approx(spearman_by_hand(it_a["sim"][:30].round(1), tied[:30]), abs=1e-12)
    iv = sts.interval(it_a, it_b, seed=1, resamples=300)
    g, sa, sb = it_a["gold"], it_a["sim"], it_b["sim"]
    lo, hi = numpy_percentile_interval(lambda i: spearman_by_hand(sa[i], g[i]) - spearman_by_hand(sb[i], g[i]), 40, 300, 1)
    assert iv.estimate == pytest.approx(after["spearman"] - before["spearman"], abs=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert iv.low < iv.estimate < iv.high


def test_clustering_interval_refits_kmeans_on_each_draw():
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    after, before = two_columns("clustering", resamples=50)
    assert after["items"]["resampled"].shape == (50,) and "x" not in after["items"]  # no embeddings kept
    iv = clustering.interval(after["items"], before["items"], seed=0, resamples=50)
    x, y = blobs(n_per=10, k=3, spread=2.0)
    x2 = x + 3 * np.random.default_rng(0).normal(size=x.shape)

    def nmi(e, i):
        u = e.astype(np.float64) / np.linalg.norm(e.astype(np.float64), axis=1, keepdims=True)
        return np.mean([normalized_mutual_info_score(y[i], KMeans(3, n_init=1, random_state=s).fit_predict(u[i])) for s in (0, 1)])

    lo, hi = numpy_percentile_interval(lambda i: nmi(x, i) - nmi(x2, i), 30, 50, 0)
    assert iv.estimate == pytest.approx(after["nmi_mean"] - before["nmi_mean"], abs=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    with pytest.raises(ValueError, match="drew 50 resamples"):
        clustering.interval(after["items"], before["items"], seed=0, resamples=200)


@pytest.mark.parametrize("family", ["classification", "sts", "retrieval", "clustering"])
def test_identical_column_gives_a_zero_interval(family):
    fam = {"classification": classification, "sts": sts, "retrieval": retrieval, "clustering": clustering}[family]
    kw = {"resamples": 50} if family == "clustering" else {}
    col, _ = two_columns(family, **kw)
    iv = fam.interval(col["items"], col["items"], seed=0, resamples=50 if family == "clustering" else 200)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.excludes_zero


def test_better_on_every_item_gives_an_interval_excluding_zero():
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 0.8, size=25)
    iv = retrieval.interval({"ndcg_at_10": before + rng.uniform(0.01, 0.2, size=25)}, {"ndcg_at_10": before})
    assert iv.excludes_zero and iv.low > 0 and iv.fmt().endswith("]*")
    half = (np.arange(24) % 2).astype(np.float64)  # every other test sentence right
    iv = classification.interval({"correct": np.ones(24)}, {"correct": half})
    assert iv.excludes_zero and iv.estimate == pytest.approx(0.5)
    noise = classification.interval({"correct": 1 - half}, {"correct": half})  # same accuracy, the other sentences right
    assert not noise.excludes_zero and noise.low < 0 < noise.high


def fake_results():
    """A results dict as evaluate() writes it: two adapters (seeds) and a control, one STS task."""
    from mi_tune.stats import Interval, across_seeds

    scores = {"base": {"spearman": 0.30, "pearson": 0.31}, "enh-s42": {"spearman": 0.4455, "pearson": 0.44},
              "enh-s7": {"spearman": 0.4469, "pearson": 0.45}, "ctl": {"spearman": 0.28, "pearson": 0.29}}
    iv = lambda est, lo, hi: Interval(est, lo, hi, n=1379).to_dict()  # noqa: E731
    cols = [{"label": "base", "role": "base"}, {"label": "enh-s42", "role": "adapter"}, {"label": "enh-s7", "role": "adapter"},
            {"label": "ctl", "role": "control"}]
    delta = {c: {m: v - scores["base"][m] for m, v in s.items()} for c, s in scores.items() if c != "base"}
    task = {"family": "sts", "main": "spearman", "scores": scores, "delta": delta,
            "interval": {"enh-s42": iv(0.1455, 0.12, 0.17), "enh-s7": iv(0.1469, 0.121, 0.172), "ctl": iv(-0.02, -0.031, 0.004)},
            "interval_vs_control": {"enh-s42": iv(0.1655, 0.14, 0.19), "enh-s7": iv(0.1669, 0.141, 0.192)},
            "bootstrap": {"method": "paired bootstrap, percentile interval (numpy)", "level": 0.95, "resamples": 2000, "seed": 0,
                          "n": 1379, "items": "sentence pairs"},
            "across_adapters": {"delta": across_seeds([0.1455, 0.1469]), "vs_control": across_seeds([0.1655, 0.1669])}}
    return {"columns": cols, "tasks": {"stsb": task}}


def test_table_shows_the_interval_of_the_main_metric_only():
    from mi_tune.eval.report import render_table

    table = render_table(fake_results())
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| stsb")}
    main, other = rows["spearman *"], rows["pearson"]
    assert main[4] == "+0.1455 [+0.1200, +0.1700]*" and main[8] == "-0.0200 [-0.0310, +0.0040]"  # enh-s42 Δ; ctl Δ: no *
    assert main[9:11] == ["+0.1655 [+0.1400, +0.1900]*", "+0.1669 [+0.1410, +0.1920]*"]  # adapter − control
    assert main[11:] == ["+0.1462 ± 0.0010", "+0.1662 ± 0.0010"]  # across adapters (seeds): Δ and − control
    assert other[4] == "+0.1300" and "[" not in " ".join(other) and other[11:] == ["", ""]
    assert "Δ across adapters (seeds)" in table and "− ctl across adapters (seeds)" in table
    for needle in ("paired bootstrap 95% interval", "percentile", "numpy", "stsb: 2000 draws of 1379 sentence pairs", "excludes 0"):
        assert needle in table, needle


def test_suite_rejects_too_few_bootstrap_draws():
    with pytest.raises(UserError, match="bootstrap_resamples/clustering_resamples"):
        load_suite(ROOT / "eval" / "downstream-cpu.yaml", ["clustering_resamples=10"])


# ---------------------------------------------------------------------------------------------
# suites


@pytest.mark.parametrize("path", sorted((ROOT / "eval").glob("*downstream*.yaml")), ids=lambda p: p.name)
def test_every_downstream_suite_parses(path):
    suite, specs = load_suite(path)
    assert suite.task == "downstream" and specs
    for name, spec in specs.items():
        assert spec.family in ("classification", "sts", "retrieval", "clustering"), name


def test_bad_suite_reports_all_problems_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: downstream\nmax_lenght: 64\ntasks:\n  a:\n    family: classification\n    train: x.jsonl\n"
                   "  b:\n    family: sts\n    max_corpus: 10\n  c:\n    family: regression\n    data: y.jsonl\n")
    with pytest.raises(UserError) as e:
        load_suite(bad)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    for needle in ("max_lenght", "did you mean `max_length`", "tasks.a.test", "tasks.b.data", "tasks.b.max_corpus", "tasks.c.family"):
        assert needle in msg, needle


def test_cpu_suite_reads_the_shared_data():
    if not (SHARED_DATA / "stsb" / "test.jsonl").exists():
        pytest.skip("shared data not present")
    suite, specs = load_suite(ROOT / "eval" / "downstream-cpu.yaml")
    assert set(specs) >= {"stsb", "ag_news", "dbpedia", "imdb", "scifact", "bbc_news"}
    data = retrieval.load(specs["scifact"], SHARED_DATA, suite.seed)
    assert len(data["docs"]) == specs["scifact"].max_corpus and len(data["queries"]) == specs["scifact"].max_queries
    judged = {d for q in data["query_ids"] for d in data["qrels"][q]}
    assert judged <= set(data["doc_ids"])  # every judged document of a kept query stays in the reduced corpus
    assert len(sts.load(specs["stsb"], SHARED_DATA)["scores"]) == 1379  # full STS-B test split


# MTEB's published STSBenchmark (test) result for sentence-transformers/all-MiniLM-L6-v2: embeddings-benchmark/results,
# results/sentence-transformers__all-MiniLM-L6-v2/8b3219a92973c328a8e22fadcfa821b5dc75636a/STSBenchmark.json (mteb 1.12.75)
MTEB_MINILM_STSB = {"spearman": 0.8203247283076371, "pearson": 0.8274064239694425}


@pytest.mark.slow
def test_minilm_stsb_reproduces_the_published_mteb_number(tmp_path):
    """Same protocol as MTEB (mean pooling, cosine, full 1,379-pair test split): agreement to 1e-5."""
    if not (SHARED_DATA / "stsb" / "test.jsonl").exists():
        pytest.skip("shared data not present")
    res = evaluate(MINILM, suite=ROOT / "eval" / "downstream-cpu.yaml", tasks=["stsb"], data_root=str(SHARED_DATA),
                   out_dir=tmp_path / "out", max_length=128, cache=False, tracking=False)  # cache off: embedded now
    got = res["tasks"]["stsb"]["scores"]["base"]
    assert res["tasks"]["stsb"]["sizes"]["n_pairs"] == 1379 and res["pooling"] == "mean"
    assert got["spearman"] == pytest.approx(MTEB_MINILM_STSB["spearman"], abs=1e-5)
    assert got["pearson"] == pytest.approx(MTEB_MINILM_STSB["pearson"], abs=1e-5)


def test_hub_sources_go_through_load_dataset(monkeypatch):
    import datasets

    calls = []
    tables = {("corpus", "corpus"): [{"_id": "d1", "title": "T", "text": "doc one"}, {"_id": "d2", "title": "", "text": "doc two"}],
              ("queries", "queries"): [{"_id": "q1", "text": "query one"}],
              ("default", "test"): [{"query-id": "q1", "corpus-id": "d2", "score": 1}],
              (None, "test"): [{"text": "a", "label": 0}, {"text": "b", "label": 1}]}

    def fake(name, config=None, split=None, revision=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(tables[(config, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = retrieval.load(TaskSpec(family="retrieval", data={"hub": "mteb/scifact"}), None)
    assert data["docs"] == ["T doc one", "doc two"] and data["qrels"] == {"q1": {"d2": 1}}
    data = clustering.load(TaskSpec(family="clustering", data={"hub": "x/y", "split": "test"}), None)
    assert data["texts"] == ["a", "b"]
    assert ("x/y", None, "test") in calls and ("mteb/scifact", "corpus", "corpus") in calls


# ---------------------------------------------------------------------------------------------
# the runner end to end on the tiny model (mechanics only)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tiny_suite(tmp_path):
    words = ["cat", "dog", "stock", "market", "rain", "sun", "goal", "match"]
    rng = np.random.default_rng(0)
    sent = lambda: " ".join(rng.choice(words, size=int(rng.integers(3, 8))))  # noqa: E731
    root = tmp_path / "data"
    write_jsonl(root / "cls" / "train.jsonl", [{"text": sent(), "label": i % 2} for i in range(24)])
    write_jsonl(root / "cls" / "test.jsonl", [{"text": sent(), "label": i % 2} for i in range(12)])
    write_jsonl(root / "sts.jsonl", [{"sentence1": sent(), "sentence2": sent(), "score": float(i % 5)} for i in range(15)])
    docs = [{"_id": f"d{i}", "title": "", "text": sent()} for i in range(20)]
    write_jsonl(root / "beir" / "corpus.jsonl", docs)
    write_jsonl(root / "beir" / "queries.jsonl", [{"_id": f"q{i}", "text": docs[i]["text"]} for i in range(5)])
    (root / "beir" / "qrels").mkdir()
    (root / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5)))
    for topic in ("sport", "tech"):
        (root / "folders" / topic).mkdir(parents=True)
        for i in range(6):
            (root / "folders" / topic / f"{i}.txt").write_text(f"{topic} {sent()}\n\nmore {topic}")
    suite = tmp_path / "tiny-downstream.yaml"
    suite.write_text(
        "task: downstream\ndata_root: data\nmax_length: 16\nbatch_size: 4\nclustering_seeds: 2\nclustering_resamples: 50\ntasks:\n"
        "  cls: {family: classification, train: cls/train.jsonl, test: cls/test.jsonl, max_train: 20}\n"
        "  sim: {family: sts, data: sts.jsonl}\n"
        "  ret: {family: retrieval, data: beir, max_corpus: 10}\n"
        f"  clu: {{family: clustering, data: {root / 'folders'}}}\n")
    return suite


@pytest.fixture
def tiny_adapter(tmp_path):
    """A LoRA adapter on the tiny Llama with non-zero B (so it changes the embeddings), saved as PEFT files."""
    import torch

    from mi_tune.config import LoraSettings, ModelConfig
    from mi_tune.modeling import add_adapters, load_model

    loaded = load_model(ModelConfig(source=str(TINY)))
    peft_model = add_adapters(loaded, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = tmp_path / "adapters" / "tiny-run"
    peft_model.save_pretrained(out)
    return out


def test_runner_base_vs_adapter_end_to_end(tiny_suite, tiny_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    res = evaluate(str(TINY), [str(tiny_adapter)], suite=tiny_suite, out_dir=out, tracking=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    saved = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in saved["columns"]] == ["base", "tiny-run"]
    assert set(saved["tasks"]) == {"cls", "sim", "ret", "clu"}
    for t in saved["tasks"].values():
        for metric, value in t["scores"]["tiny-run"].items():
            assert t["delta"]["tiny-run"][metric] == pytest.approx(value - t["scores"]["base"][metric])
    assert saved["tasks"]["ret"]["sizes"] == {"n_queries": 5, "n_docs": 10, "full_corpus": 0.0}
    assert saved["tasks"]["cls"]["sizes"]["n_train"] == 20
    # queries identical to their documents: every model retrieves them first
    assert saved["tasks"]["ret"]["scores"]["base"]["ndcg_at_10"] == pytest.approx(1.0)
    # the adapter changes the embeddings, so at least one score moves
    assert any(abs(v) > 1e-9 for t in saved["tasks"].values() for v in t["delta"]["tiny-run"].values())
    assert res["layer"] == 3 and res["pooling"] == "last"
    # every main-metric Δ carries its paired bootstrap interval, over the task's items, shown in the table
    table = (out / "table.md").read_text()
    from mi_tune.eval.report import fmt_interval

    for name, n, draws in (("cls", 12, 2000), ("sim", 15, 2000), ("ret", 5, 2000), ("clu", 12, 50)):
        t = saved["tasks"][name]
        iv = t["interval"]["tiny-run"]
        assert (iv["n"], iv["resamples"], t["bootstrap"]["n"]) == (n, draws, n) and t["interval_vs_control"] == {}
        assert iv["estimate"] == pytest.approx(t["delta"]["tiny-run"][t["main"]], abs=1e-12)
        assert iv["low"] <= iv["estimate"] <= iv["high"] or name == "clu"  # k-means on drawn rows may sit off the full-sample score
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} ") and f" {t['main']} *" in line)
        assert fmt_interval(iv, 0.0) in row and "[" in fmt_interval(iv, 0.0)
    assert "paired bootstrap 95% interval" in table and "clu: 50 draws of 12 items" in table and "across adapters" not in table
    # a rerun reads every embedding from the cache and gives identical numbers
    again = evaluate(str(TINY), [str(tiny_adapter)], suite=tiny_suite, out_dir=tmp_path / "out2", tracking=False)
    assert all(c["texts_embedded"] == 0 for c in again["columns"])
    assert again["tasks"] == res["tasks"]


def test_adapters_and_control_get_paired_intervals_and_a_spread(tiny_suite, tiny_adapter, tmp_path, monkeypatch):
    """Three copies of one adapter: two as adapters, one as the control. Every adapter − control interval is [0, 0]
    (same embeddings, same draws) and the spread across the adapters is 0."""
    import shutil

    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    copies = [shutil.copytree(tiny_adapter, tmp_path / "adapters" / name) for name in ("seed7", "control")]
    res = evaluate(str(TINY), [str(tiny_adapter), str(copies[0])], control=str(copies[1]), suite=tiny_suite, tasks=["sim", "clu"],
                   overrides=["bootstrap_resamples=200"], out_dir=tmp_path / "out", tracking=False)
    table = (tmp_path / "out" / "table.md").read_text()
    for t in res["tasks"].values():
        assert set(t["interval"]) == {"tiny-run", "seed7", "control"} and set(t["interval_vs_control"]) == {"tiny-run", "seed7"}
        assert t["interval"]["tiny-run"] == t["interval"]["seed7"] == t["interval"]["control"]  # same draws for every column
        for iv in t["interval_vs_control"].values():
            assert (iv["estimate"], iv["low"], iv["high"], iv["excludes_zero"]) == (0.0, 0.0, 0.0, False)
        spread = t["across_adapters"]
        assert spread["delta"]["n"] == 2 and spread["delta"]["sd"] == 0.0 and spread["vs_control"]["mean"] == 0.0
        assert t["bootstrap"]["resamples"] == (50 if t["family"] == "clustering" else 200)
        assert spread["score"]["mean"] == pytest.approx(t["scores"]["tiny-run"][t["main"]])
    assert "Δ across adapters (seeds)" in table and "− control across adapters (seeds)" in table
    assert "+0.0000 [+0.0000, +0.0000]" in table and "+0.0000 ± 0.0000" in table


def tracked_adapter(tiny_adapter, tmp_path, monkeypatch):
    """A finished MLflow run (SQLite store in tmp_path) that the tiny adapter names in its tracking_run.json; the cache
    and the working directory in tmp_path. Returns (client, tracking URI, the run)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("mi_tune", artifact_location=(tmp_path / "art").as_uri()), run_name="tiny-run")
    client.set_terminated(run.info.run_id)
    (tiny_adapter / "tracking_run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
    return client, uri, run


def test_results_attach_to_the_training_run(tiny_suite, tiny_adapter, tmp_path, monkeypatch):
    client, uri, run = tracked_adapter(tiny_adapter, tmp_path, monkeypatch)
    res = evaluate(str(TINY), [str(tiny_adapter)], suite=tiny_suite, tasks=["sim"], out_dir=tmp_path / "out", tracking=True)
    assert res["tracking_runs"] == [run.info.run_id]
    metrics = client.get_run(run.info.run_id).data.metrics
    assert "downstream_tiny_sim_spearman_delta" in metrics and "downstream_tiny_sim_spearman_base" in metrics
    assert metrics["downstream_tiny_sim_spearman"] == pytest.approx(res["tasks"]["sim"]["scores"]["tiny-run"]["spearman"])
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "downstream/tiny-downstream")]
    assert sorted(Path(a).name for a in arts) == sorted(OUTPUT_FILES)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_cli_bad_input_exits_2_without_traceback(tiny_suite):
    r = run_cli("mi_tune.eval", str(tiny_suite), "--model", str(TINY), "--tasks", "nope", "--no-tracking")
    assert r.returncode == 2, r.stderr
    assert "--tasks: got 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("mi_tune.eval", "downstream", "--suite", str(tiny_suite))
    assert r.returncode == 2 and "no model given" in r.stderr


# ---------------------------------------------------------------------------------------------
# MTEB wrapper: an MTEB task built from local files, no network


@pytest.mark.slow
def test_mteb_wrapper_runs_local_tasks_and_agrees_with_our_metrics():
    pytest.importorskip("mteb")
    if not (SHARED_DATA / "stsb" / "test.jsonl").exists():
        pytest.skip("shared data not present")
    from mi_tune.embedding import embed_texts
    from mi_tune.eval.mteb_wrapper import MiTuneEncoder, local_retrieval_task, local_sts_task, run_local

    enc = MiTuneEncoder(MINILM, max_length=128)
    assert (enc.layer, enc.pooling) == (6, "mean")
    emb = lambda xs: embed_texts(enc.ready.model, enc.ready.tokenizer, xs, enc.layer, enc.pooling, 128)  # noqa: E731

    rows = [json.loads(line) for line in (SHARED_DATA / "stsb" / "test.jsonl").open()][:60]
    s1, s2, gold = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [r["score"] for r in rows]
    scores = run_local(enc, local_sts_task("LocalSTSB60", s1, s2, gold))
    assert scores["cosine_spearman"] == pytest.approx(sts.metrics(emb(s1), emb(s2), gold)["spearman"], abs=1e-6)

    spec = TaskSpec(family="retrieval", data="retrieval/scifact", max_queries=12, max_corpus=40)
    data = retrieval.load(spec, SHARED_DATA)
    corpus = dict(zip(data["doc_ids"], data["docs"]))
    scores = run_local(enc, local_retrieval_task("LocalSciFact12", dict(zip(data["query_ids"], data["queries"])), corpus, data["qrels"]))
    ours = retrieval.run(data, lambda xs, role: emb(xs))
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg_at_10"], abs=1e-4)  # MTEB rounds to 5 decimals
    assert scores["recall_at_100"] == pytest.approx(ours["recall_at_100"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# sentence-transformers export


def st_vs_ours(path, model, adapter, texts, max_length, ready=None):
    from sentence_transformers import SentenceTransformer

    from mi_tune.embedding import embed_texts
    from mi_tune.loading import load_ready

    info = json.loads((Path(path) / "mi_tune_export.json").read_text())
    ready = ready or load_ready(model, adapter)
    ours = embed_texts(ready.model, ready.tokenizer, texts, info["layer"], info["pooling"], max_length, batch_size=3)
    theirs = SentenceTransformer(str(path), device="cpu").encode(texts, batch_size=5, convert_to_numpy=True)
    return ours, theirs


def assert_same_embeddings(ours, theirs):
    # Tolerance: float32, different batch composition (padding) on each side -> |Δ| <= 1e-4 * max|e|, cosine >= 0.99999.
    scale = float(np.abs(ours).max())
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * scale)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999


TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "Rain",
         "A much longer sentence about football matches, goals, referees and the weather in the stadium."]


def test_export_tiny_llama_with_adapter_matches_embed_texts(tiny_adapter, tmp_path):
    from mi_tune.export import export_sentence_transformers

    out = export_sentence_transformers(tmp_path / "st", str(TINY), str(tiny_adapter), max_length=32)
    assert {"modules.json", "mi_tune_export.json", "config_sentence_transformers.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "mi_tune_export.json").read_text())["merged_adapter"] is True
    ours, theirs = st_vs_ours(out, str(TINY), str(tiny_adapter), TEXTS, 32)
    assert_same_embeddings(ours, theirs)


def test_export_refuses_a_middle_layer_of_a_model_with_a_final_norm(tmp_path):
    from mi_tune.export import export_sentence_transformers

    with pytest.raises(UserError, match="final `norm`"):
        export_sentence_transformers(tmp_path / "st", str(TINY), layer=1)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [None, 3])
def test_export_minilm_matches_embed_texts(tmp_path, layer):
    from mi_tune.export import export_sentence_transformers

    out = export_sentence_transformers(tmp_path / "st", MINILM, layer=layer, max_length=128)
    ours, theirs = st_vs_ours(out, MINILM, None, TEXTS, 128)
    assert_same_embeddings(ours, theirs)


@pytest.mark.slow
def test_export_smollm2_gguf_matches_embed_texts(smollm2, tmp_path):
    """The real GGUF decoder: rebuilt from its config (GGUF models refuse save_pretrained), no chat template."""
    from mi_tune.export import export_sentence_transformers
    from mi_tune.loading import ReadyModel

    ready = ReadyModel(smollm2, None, None, None)
    out = export_sentence_transformers(tmp_path / "st", max_length=64, ready=ready)
    assert json.loads((out / "mi_tune_export.json").read_text())["pooling"] == "last"
    assert not list(out.glob("chat_template*"))
    ours, theirs = st_vs_ours(out, None, None, TEXTS, 64, ready=ready)
    assert_same_embeddings(ours, theirs)
