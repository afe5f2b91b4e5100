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
        "task: downstream\ndata_root: data\nmax_length: 16\nbatch_size: 4\nclustering_seeds: 2\ntasks:\n"
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
    # a rerun reads every embedding from the cache and gives identical numbers
    again = evaluate(str(TINY), [str(tiny_adapter)], suite=tiny_suite, out_dir=tmp_path / "out2", tracking=False)
    assert all(c["texts_embedded"] == 0 for c in again["columns"])
    assert again["tasks"] == res["tasks"]


def test_results_attach_to_the_training_run(tiny_suite, tiny_adapter, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("mi_tune", artifact_location=(tmp_path / "art").as_uri()), run_name="tiny-run")
    client.set_terminated(run.info.run_id)
    (tiny_adapter / "tracking_run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
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
