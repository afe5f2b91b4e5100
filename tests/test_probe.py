"""The layer probe: metrics against hand-made cases, exact compact decoders, one-pass features, the feature
cache, output files, adapters (before/after) and the suite files. Mechanics on the tiny random Llama; one
real-model test (MiniLM-L6, well under a minute)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mi_tune.decoders import (RIDGE_GCV_GRID, BagSet, _standardize, compact_bags, compact_metrics, fit_bce, fit_ridge,
                              prior_per_sentence)
from mi_tune.errors import UserError
from mi_tune.eval.layer_metrics import MISS, adapter_deltas, recovered_list, scored_set, summarize, text_scores
from mi_tune.eval.probe import load_suite, main as probe_main, resolve_data_root, resolve_source
from mi_tune.losses import recoverability_loss
from mi_tune.metrics import bag_cosine, fano_uniform_estimate_bits, recoverability_accuracy

from .conftest import MINILM, ROOT, SHARED_DATA, TINY, TINY_CORPUS, run_cli

PLOTS = {"recoverability_acc.png", "cosine.png", "bleu.png", "rouge1_f.png", "rouge2_f.png", "mi_lb_bits.png", "mi_variational_lb_bits.png",
         "mi_fano_list_lb_bits.png", "mi_fano_uniform_bits.png", "ce_gain_over_prior_bits.png"}


# ---- metrics against hand-made cases -----------------------------------------------------------


def test_papers_estimate_at_a_real_vocabulary_size():
    V = 49152
    assert fano_uniform_estimate_bits(1.0, V) == pytest.approx(math.log2(V))  # Pe = 0: all of log2|V|
    assert fano_uniform_estimate_bits(1.0 / V, V) == pytest.approx(0.0, abs=1e-9)  # Pe = 1 - 1/|V|: chance, nothing
    pe = 0.7
    hb = -(pe * math.log2(pe) + (1 - pe) * math.log2(1 - pe))
    assert fano_uniform_estimate_bits(1 - pe, V) == pytest.approx(math.log2(V) - hb - pe * math.log2(V - 1))


def test_recovered_list_orders_hits_by_first_occurrence_then_misses():
    sentence = [7, 3, 9, 3, 5]
    top = [5, 42, 3, 7, 99]  # decreasing score; 42 and 99 are not in the sentence
    assert recovered_list(top, sentence) == [7, 3, 5, 42, 99]
    assert recovered_list([], sentence) == []


def test_text_scores_hand_cases():
    ref = [[1, 2, 3, 4, 5, 6, 7, 8]]
    same = text_scores(ref, ref)
    assert same["bleu"] == pytest.approx(100.0) and same["rouge1_f"] == pytest.approx(1.0) and same["rouge2_f"] == pytest.approx(1.0)
    assert text_scores([[11, 12, 13]], [[1, 2, 3]])["bleu"] == pytest.approx(0.0)
    # one wrong token at the end: n-gram precisions 7/8, 6/7, 5/6, 4/5, no brevity penalty -> 100 * (1/2)^(1/4)
    one_off = text_scores([[1, 2, 3, 4, 5, 6, 7, 9]], ref)
    assert one_off["bleu"] == pytest.approx(100 * 0.5 ** 0.25, rel=1e-6)
    assert one_off["rouge1_f"] == pytest.approx(7 / 8) and one_off["rouge2_f"] == pytest.approx(6 / 7)
    # two hits of a 3-token sentence plus one miss: ROUGE-1 P = R = 2/3; no shared bigram
    part = text_scores([[5, 7, MISS]], [[5, 6, 7]])
    assert part["rouge1_f"] == pytest.approx(2 / 3) and part["rouge2_f"] == 0.0
    # ROUGE-1 F is the mean over sentences
    assert text_scores([[1, 2], [9]], [[1, 2], [3]])["rouge1_f"] == pytest.approx(0.5)


def test_rouge_l_equals_rouge_1_for_recovered_lists():
    """Why ROUGE-L is not reported: with hits in sentence order and misses absent from the sentence, LCS = hits."""
    from rouge_score import rouge_scorer

    rng = np.random.default_rng(0)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    for _ in range(50):
        sentence = list(rng.integers(0, 30, size=rng.integers(3, 20)))
        bag = sorted(set(sentence))
        k = len(bag)
        top = list(rng.permutation(bag + list(range(100, 130)))[:k])
        hyp = " ".join(map(str, recovered_list(top, sentence)))
        s = scorer.score(" ".join(map(str, sentence)), hyp)
        assert s["rougeL"].fmeasure == pytest.approx(s["rouge1"].fmeasure)


def test_compact_metrics_tie_block_by_hand():
    # V = 6; seen ids 0, 1, 2; ids 3, 4, 5 never seen (one tied score 0). Bag {0, 4}: k = 2.
    C = torch.tensor([[2.0, -1.0, -2.0, 0.0]])  # scores of ids 0, 1, 2 and of the tied block
    ya = torch.tensor([[1.0, 0.0, 0.0]])
    u = torch.tensor([1.0])  # id 4 is in the bag but was never seen
    acc, cos, idx, n_active = compact_metrics(C, ya, u, unseen=3, linear=True)
    # top-2 = id 0 (a hit) + one of the 3 tied ids, of which 1 is in the bag: expected hits 1 + 1/3
    assert acc.item() == pytest.approx((1 + 1 / 3) / 2)
    assert n_active.item() == 1 and idx[0, 0].item() == 0
    # ridge probabilities clip to [0, 1]: p = (1, 0, 0, 0, 0, 0); cosine with the bag (1, 0, 0, 0, 1, 0) = 1/sqrt(2)
    assert cos.item() == pytest.approx(1 / math.sqrt(2))
    # the block ranks below every seen id when its score is lowest
    acc2, *_ = compact_metrics(torch.tensor([[2.0, 1.0, 0.5, -5.0]]), ya, u, unseen=3, linear=True)
    assert acc2.item() == pytest.approx(0.5)  # top-2 = ids 0 and 1: one hit


def test_prior_baseline_ranks_by_training_frequency():
    V = 6
    train = scored_set("t", "train", [[1, 2, 3], [1, 2], [1]], V, [0])  # document frequency: id 1: 3, id 2: 2, id 3: 1
    ev = scored_set("e", "eval", [[1, 3], [5, 4]], V, [0])
    active = torch.tensor([1, 2, 3])
    # sentence 1: top-2 = {1, 2}, one hit; sentence 2: top-2 = {1, 2}, no hit (ids 4, 5 never seen, frequency 0)
    prior = prior_per_sentence(train.bags.columns(active), BagSet.of(ev.bags, active), V)
    assert prior.tolist() == pytest.approx([0.5, 0.0])


def test_summary_and_adapter_deltas_from_hand_made_rows():
    """summarize / adapter_deltas are pure: rows in, dicts out. Base peaks at layer 1 of 2; the adapter adds 0.1 to
    every sentence at every layer, so each paired difference is a constant and its interval has no width."""
    n = 8
    acc = {0: np.full(n, 0.2), 1: np.linspace(0.4, 0.6, n), 2: np.full(n, 0.3)}  # (N,) per-sentence accuracy per layer
    rows = [{"model": "m", "variant": v, "set": "ev", "role": "eval", "layer": l, "num_blocks": 2, "_prior": np.full(n, 0.1),
             "_acc": a + (0.1 if v == "adapter" else 0.0)} for v in ("base", "adapter") for l, a in acc.items()]
    summary = summarize(rows, resamples=200)
    base = next(s for s in summary if s["variant"] == "base")
    assert (base["best_layer"], base["best_depth"], base["last_layer"], base["set"]) == (1, 0.5, 2, "ev")
    assert (base["best_acc"], base["last_acc"], base["first_acc"], base["prior_acc"]) == pytest.approx((0.5, 0.3, 0.2, 0.1))
    assert base["drop_interval"]["estimate"] == pytest.approx(0.2) and base["drop_interval"]["excludes_zero"]
    deltas = adapter_deltas(rows, summary, resamples=200)
    assert [(d["at"], d["layer"]) for d in deltas] == [("best", 1), ("last", 2)]
    for d in deltas:
        assert (d["estimate"], d["low"], d["high"]) == pytest.approx((0.1, 0.1, 0.1))


@pytest.mark.parametrize("decoder", ["ridge", "bce"])
def test_compact_metrics_equal_dense_metrics(decoder):
    rng = np.random.default_rng(1)
    V, D, N = 40, 8, 60
    train = [list(rng.integers(3, 30, size=rng.integers(3, 9))) for _ in range(N)]  # ids 30..39 never seen
    evals = [list(rng.integers(3, 40, size=rng.integers(3, 9))) for _ in range(N)]
    tr = scored_set("t", "train", train, V, [0, 1, 2])
    ev = scored_set("e", "eval", evals, V, [0, 1, 2])
    X, Xe = torch.randn(1, N, D), torch.randn(N, D)
    dec = fit_ridge(X, tr.bags, 0.1) if decoder == "ridge" else fit_bce(X, tr.bags, epochs=20, lr=0.05, batch_size=16)
    dense, y = dec.scores(Xe, 0), ev.bags.dense()
    probs = dense.clamp(0, 1) if decoder == "ridge" else torch.sigmoid(dense)
    ya, u = compact_bags(ev.bags, dec.active)
    acc, cos, _, _ = compact_metrics(dec.compact_scores(Xe, 0), ya.float(), u, V - len(dec.active), decoder == "ridge")
    torch.testing.assert_close(acc, recoverability_accuracy(dense, y))
    torch.testing.assert_close(cos, bag_cosine(probs, y))


# ---- decoders: the compact form is exactly the full-vocabulary decoder -----------------------------


def _data(L=3, N=40, D=6, V=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(L, N, D, generator=g)
    Y = (torch.rand(N, V, generator=g) < 0.15).float()
    Y[:, 20:] = 0  # five ids never occur in training
    return X, Y


def test_ridge_equals_dense_normal_equations_and_gcv_picks_the_explicit_minimum():
    X, Y = _data()
    L, N, D = X.shape
    Z, _, _ = _standardize(X)
    dec = fit_ridge(X, Y, 0.1)
    for l in range(L):
        W = torch.linalg.solve(Z[l].T @ Z[l] + 0.1 * N * torch.eye(D), Z[l].T @ (Y - Y.mean(0)))
        torch.testing.assert_close(dec.scores(X[l], l), Z[l] @ W + Y.mean(0), atol=1e-5, rtol=1e-5)
    assert dec.scores(X[0], 0)[:, 20:].abs().max() == 0  # never-seen ids: exactly 0
    gcv = fit_ridge(X, Y, "gcv")
    for l in range(L):
        Zl, Yc = Z[l].double(), (Y - Y.mean(0)).double()
        errs = []
        for lam in RIDGE_GCV_GRID:
            H = Zl @ torch.linalg.solve(Zl.T @ Zl + lam * N * torch.eye(D, dtype=torch.float64), Zl.T)
            rss, df = float(((Yc - H @ Yc) ** 2).sum()), float(H.trace()) + 1
            errs.append(rss / N / (1 - df / N) ** 2)
        assert gcv.lam[l].item() == pytest.approx(RIDGE_GCV_GRID[int(np.argmin(errs))])


def test_bce_equals_dense_full_vocabulary_training():
    X, Y = _data()
    L, N, D = X.shape
    V = Y.shape[1]
    Z, _, _ = _standardize(X)
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(L, D, V, requires_grad=True)
    prior = Y.mean(0).clamp(1e-6, 1 - 1e-6)
    b = torch.log(prior / (1 - prior)).expand(L, 1, V).clone().requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(15):
        perm = torch.randperm(N, generator=g)
        for start in range(0, N, 16):
            idx = perm[start: start + 16]
            logits = Z[:, idx] @ W + b
            loss = sum(recoverability_loss(logits[i], Y[idx]) for i in range(L))
            opt.zero_grad()
            loss.backward()
            opt.step()
    dec = fit_bce(X, Y, epochs=15, lr=0.05, batch_size=16)
    for l in range(L):
        torch.testing.assert_close(dec.scores(X[l], l), (Z[l] @ W[l] + b[l]).detach(), atol=1e-5, rtol=1e-5)


# ---- features ---------------------------------------------------------------------------------------


def test_one_pass_features_equal_per_layer_forward_features():
    from mi_tune.config import ModelConfig
    from mi_tune.embedding import embed_token_ids, hidden_states, tokenize
    from mi_tune.modeling import load_model
    from mi_tune.pooling import pool

    m = load_model(ModelConfig(source=str(TINY)))
    texts = [json.loads(line)["text"] for line in TINY_CORPUS.read_text().splitlines()[:12]]
    seqs = tokenize(m.tokenizer, texts, 24)
    layers = list(range(m.num_hidden_states))
    one_pass = embed_token_ids(m.model, seqs, m.tokenizer.pad_token_id, layers, "last", batch_size=5)  # (N, L+1, D)
    for layer in layers:
        # a separate forward per layer, one unpadded sentence at a time: the naive reference
        for i, s in enumerate(seqs):
            ids = torch.tensor([s])
            mask = torch.ones_like(ids)
            with torch.no_grad():
                ref = pool(hidden_states(m.model, ids, mask)[layer], mask, "last")[0]
            torch.testing.assert_close(torch.from_numpy(one_pass[i, layer]), ref, atol=1e-5, rtol=1e-4)
        per_layer = embed_token_ids(m.model, seqs, m.tokenizer.pad_token_id, [layer], "last", batch_size=5)[:, 0]
        np.testing.assert_array_equal(one_pass[:, layer], per_layer)


# ---- the probe end to end (tiny model) ------------------------------------------------------------------


def _tiny_probe(tmp_path, out, *extra, eval_file=None):
    eval_file = eval_file or tmp_path / "eval.jsonl"
    if not eval_file.exists():
        lines = TINY_CORPUS.read_text().splitlines()
        eval_file.write_text("\n".join(lines[::-1]) + "\n")
    return probe_main(["--model", str(TINY), "--train", str(TINY_CORPUS), "--eval", f"{eval_file}#text", "--name", "tiny",
                       "--train-sentences", "120", "--eval-sentences", "40", "--max-length", "24", "--out", str(out),
                       f"cache_dir={tmp_path / 'cache'}", "text_metrics_sentences=20", *extra])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    first = _tiny_probe(tmp, tmp / "out1", "--decoder", "ridge")
    second = _tiny_probe(tmp, tmp / "out2", "--decoder", "ridge")
    return tmp, first, second


def test_probe_output_files_and_rows(tiny_runs):
    tmp, first, _ = tiny_runs
    out = tmp / "out1"
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"probe.csv", "probe.json", "claims.md", "claims.json", "plots/claims_curves.png"} | {f"plots/{p}" for p in PLOTS}
    rows = first["rows"]
    assert {r["layer"] for r in rows} == {0, 1, 2, 3}  # all hidden states, 0 = embeddings
    assert {r["role"] for r in rows} == {"train", "eval"}  # the training set is scored too
    for r in rows:
        assert r["depth"] == r["layer"] / 3
        assert 0.0 <= r["recoverability_acc"] <= 1.0 and 0.0 <= r["cosine"] <= 1.0 and 0.0 <= r["bleu"] <= 100.0
        assert r["mi_lb_bits"] == max(r["mi_variational_lb_bits"], r["mi_fano_list_lb_bits"]) >= 0.0
        assert r["mi_variational_lb_bits"] == pytest.approx(max(r["token_entropy_bits"] - r["cross_entropy_bits"], 0.0))
        assert 0.0 < r["token_entropy_bits"] <= math.log2(r["vocab_size"])
    saved = json.loads((out / "probe.json").read_text())
    assert saved["setup"]["data"]["assets/tiny_corpus.jsonl"]["used"] == 120
    assert len(saved["rows"]) == len(rows) == 4 * 2
    import csv

    with open(out / "probe.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_cache_hit_gives_identical_results_without_loading_weights(tiny_runs):
    _, first, second = tiny_runs
    t1 = first["setup"]["models"]["tiny-llama"]["timings"]
    t2 = second["setup"]["models"]["tiny-llama"]["timings"]
    assert t1["base"]["cache_hits"] == 0 and t2["base"]["cache_hits"] == 2
    assert t2["load_s"] == 0.0  # every feature came from the cache: the weights were never loaded
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]  # noqa: E731
    assert strip(first["rows"]) == strip(second["rows"])
    for a, b in zip(first["rows"], second["rows"]):  # the per-sentence accuracies behind the intervals, too
        np.testing.assert_array_equal(a["_acc"], b["_acc"])


def test_bce_probe_and_layer_selection(tmp_path):
    res = _tiny_probe(tmp_path, tmp_path / "out", "--decoder", "bce", "--layers", "0,-1", "bce_epochs=3")
    assert {r["layer"] for r in res["rows"]} == {0, 3} and {r["decoder"] for r in res["rows"]} == {"bce"}


def test_adapter_probe_gives_before_and_after(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    plain = _tiny_probe(tmp_path, tmp_path / "plain", "--decoder", "ridge", "--layers", "0,1,3")
    res = _tiny_probe(tmp_path, tmp_path / "out", "--decoder", "ridge", "--layers", "0,1,3", "--adapter", str(tmp_path / "adapter"))
    assert (tmp_path / "out" / "plots" / "base_vs_adapter_tiny-llama.png").exists()
    timings = res["setup"]["models"]["tiny-llama"]["timings"]
    assert timings["base"]["cache_hits"] == 2 and timings["adapter"]["cache_hits"] == 0  # base features shared with the plain run
    base = [r for r in res["rows"] if r["variant"] == "base"]
    after = [r for r in res["rows"] if r["variant"] == "adapter"]
    assert [r["recoverability_acc"] for r in base] == [r["recoverability_acc"] for r in plain["rows"]]
    # the embeddings (layer 0) are not adapted; the adapted blocks change what the decoder sees
    assert after[0]["recoverability_acc"] == base[0]["recoverability_acc"]
    assert any(a["cosine"] != b["cosine"] for a, b in zip(after, base) if a["layer"] > 0)


def test_adapter_probe_attaches_to_the_training_run_as_a_child(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                   init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("mi_tune", artifact_location=(tmp_path / "art").as_uri()), run_name="train")
    client.set_terminated(run.info.run_id)
    (tmp_path / "adapter" / "tracking_run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
    res = _tiny_probe(tmp_path, tmp_path / "out", "--decoder", "ridge", "--layers", "0,3", "--adapter", str(tmp_path / "adapter"))
    exp = client.get_run(run.info.run_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 1 and children[0].info.run_name.startswith("probe-") and children[0].info.status == "FINISHED"
    child = children[0].info.run_id
    for variant in ("base", "adapter"):
        for set_name in {r["set"] for r in res["rows"]}:
            want = {r["layer"]: r["recoverability_acc"] for r in res["rows"] if r["variant"] == variant and r["set"] == set_name}
            key = f"probe_{variant}_{re.sub(r'[^A-Za-z0-9]+', '_', set_name).strip('_')}_recoverability_acc"
            got = {m.step: m.value for m in client.get_metric_history(child, key)}
            assert got == pytest.approx(want), key
    assert {a.path for a in client.list_artifacts(child, "probe")} >= {"probe/probe.csv", "probe/probe.json"}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # the training run itself is left as it was


# ---- user errors and suite files ----------------------------------------------------------------------


def test_bad_layer_is_a_house_error_with_exit_code_2(tmp_path):
    (tmp_path / "e.jsonl").write_text(TINY_CORPUS.read_text())
    res = run_cli("mi_tune.eval", "probe", "--model", str(TINY), "--train", str(TINY_CORPUS), "--eval", str(tmp_path / "e.jsonl") + "#text",
                  "--name", "x", "--layers", "0,7", "--out", str(tmp_path / "o"), f"cache_dir={tmp_path}", "eval_sentences=5",
                  "train_sentences=5", "--max-length", "8", timeout=300)
    assert res.returncode == 2, res.stderr
    assert "layer=7 is out of range" in res.stderr and "Traceback" not in res.stderr


def test_suite_errors_are_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: probe\nmodels: []\ntrain: {source: x.jsonl}\neval: [{source: y.jsonl, feild: text}]\ndecoder: lasso\n")
    with pytest.raises(UserError) as exc:
        load_suite(bad)
    msg = str(exc.value)
    assert "eval[0].feild" in msg and "decoder" in msg and "models" in msg and "3 problem(s)" in msg


SUITES = sorted((ROOT / "eval").glob("probe*.yaml")) + sorted((ROOT / "eval").glob("paper-probe*.yaml"))


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_shipped_suites_validate_and_open_with_their_command(path):
    suite, models, train, evals = load_suite(path)
    assert suite.task == "probe" and models and train.source and evals
    head = path.read_text().split("\n\n")[0]
    assert head.startswith("#") and f"python -m mi_tune.eval eval/{path.name}" in head


def test_cpu_suite_data_paths_resolve_under_the_data_root(monkeypatch, tmp_path):
    suite, _, train, evals = load_suite(ROOT / "eval" / "probe-cpu.yaml")
    monkeypatch.delenv("MI_TUNE_DATA_ROOT", raising=False)
    root = resolve_data_root(suite, str(tmp_path))  # --data-root wins
    assert root == tmp_path
    assert resolve_source(train.source, root) == str(tmp_path / train.source)
    assert resolve_source("fancyzhx/ag_news", root) == "fancyzhx/ag_news"  # Hub names stay Hub names
    monkeypatch.setenv("MI_TUNE_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="MI_TUNE_DATA_ROOT"):
        resolve_data_root(suite, None)
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("MI_TUNE_DATA_ROOT", str(SHARED_DATA))
        root = resolve_data_root(suite, None)
        assert all(Path(resolve_source(d.source, root)).is_file() for d in [train, *evals])


# ---- one real model ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the shared evaluation data")
def test_real_encoder_recovers_tokens_far_above_chance(tmp_path):
    """MiniLM-L6 on DBpedia -> AG News: a real encoder's pooled vectors carry many of the sentence's tokens."""
    res = probe_main(["--model", MINILM, "--train", str(SHARED_DATA / "dbpedia14" / "train_sample.jsonl"),
                      "--eval", str(SHARED_DATA / "ag_news" / "test.jsonl"), "--name", "minilm", "--decoder", "ridge",
                      "--train-sentences", "300", "--eval-sentences", "60", "--max-length", "32", "--out", str(tmp_path / "o"),
                      f"cache_dir={tmp_path / 'cache'}", "text_metrics_sentences=30"])
    evals = [r for r in res["rows"] if r["role"] == "eval"]
    assert len(evals) == 7  # 6 blocks + embeddings
    best = max(r["recoverability_acc"] for r in evals)
    chance = 30 / 30522  # about k/|V| for bags of ~30 tokens
    assert best > 100 * chance and best > 0.2
    train = [r for r in res["rows"] if r["role"] == "train"]
    assert max(r["recoverability_acc"] for r in train) >= best  # in-sample is at least as good


def test_tracking_logs_each_layer_as_a_step_and_the_plots(tmp_path, monkeypatch):
    import mi_tune.tracking as tracking

    calls = {"metrics": [], "artifacts": [], "ended": None}

    class Recorder(tracking.NullTracker):
        def log_metrics(self, metrics, step=None):
            calls["metrics"].append((step, metrics))

        def log_artifact(self, path, artifact_path=None):
            calls["artifacts"].append(Path(path).name)

        def end(self, status="FINISHED"):
            calls["ended"] = status

    monkeypatch.setattr(tracking, "start_tracking", lambda settings, *a, **k: Recorder() if settings.enabled else tracking.NullTracker())
    _tiny_probe(tmp_path, tmp_path / "out", "--decoder", "ridge", "--layers", "0,2", "--tracking")
    steps = sorted({step for step, _ in calls["metrics"]})
    assert steps == [0, 2]
    keys = {k for _, m in calls["metrics"] for k in m}
    assert "tiny-llama.base/assets/tiny_corpus.jsonl/recoverability_acc" in keys
    assert {"probe.csv", "probe.json", "recoverability_acc.png"} <= set(calls["artifacts"]) and calls["ended"] == "FINISHED"


def test_control_task_selectivity_separates_information_from_decoder_capacity(capsys):
    """Synthetic bags: layer 1 = a noisy linear image of the bag, layer 0 = noise. The control decoder (fitted to other
    sentences' bags) stays at the prior's level on held-out sentences at both layers, so selectivity is large where the layer carries the bag and ~0 where it does not."""
    import numpy as np
    import torch

    from mi_tune.eval.layer_metrics import derangement, probe_layers, scored_set, summarize
    from mi_tune.eval.suites import ProbeSuite

    rng = np.random.default_rng(0)
    V, D = 80, 48
    proj = rng.standard_normal((V, D))

    def synth(n):
        seqs = [list(rng.choice(np.arange(2, V), size=rng.integers(4, 10), replace=False)) for _ in range(n)]
        bags = np.zeros((n, V))
        for i, s in enumerate(seqs):
            bags[i, s] = 1
        layers = [rng.standard_normal((n, D)), bags @ proj + 0.3 * rng.standard_normal((n, D))]
        return [[0] + [int(t) for t in s] for s in seqs], np.stack(layers, 1).astype(np.float32)

    (tr_seqs, tr_X), (ev_seqs, ev_X) = synth(400), synth(200)
    sets = [scored_set("train", "train", tr_seqs, V, [0]), scored_set("ev", "eval", ev_seqs, V, [0], ev_seqs)]
    rows = probe_layers({"train": tr_X, "ev": ev_X}, sets, [0, 1], V, ProbeSuite(decoder="ridge", control_task=True,
                                                                                   text_metrics_sentences=20))
    by = {(r["layer"], r["set"]): r for r in rows}
    assert by[1, "ev"]["recoverability_acc"] > 0.8 and by[1, "ev"]["selectivity"] > 0.7
    for layer in (0, 1):  # held out, the control is at the prior's level: it learned nothing about the sentence
        assert abs(by[layer, "ev"]["control_acc"] - by[layer, "ev"]["prior_acc"]) < 0.01
        assert by[layer, "train"]["control_acc"] < 0.2  # in sample it only memorises a little (the decoder's capacity)
    assert abs(by[0, "ev"]["selectivity"]) < 0.02
    for r in rows:
        r.update(model="m", variant="base", num_blocks=1)
    summary = summarize(rows)[0]
    assert summary["best_layer"] == 1 and summary["selectivity_best"]["low"] > 0.7
    assert 0 < summary["control_train_acc_best"] < 0.2
    from mi_tune.eval.report import print_summary

    print_summary([summary])
    assert "control, in sample (capacity)" in capsys.readouterr().out
    d = derangement(50, torch.Generator().manual_seed(3))
    assert sorted(d.tolist()) == list(range(50)) and not (d == torch.arange(50)).any()


def test_two_poolings_of_one_model_come_from_one_forward_pass(tmp_path):
    """A suite probing one model with last AND mean pooling runs the model once: the second entry's features were cached
    by the first entry's pass (its weights never load), and they equal a run of mean pooling alone."""
    from mi_tune.eval.probe import run_probe, suite_from_dict

    def suite(models, cache):
        return suite_from_dict({"name": "two", "models": models, "train": {"source": str(TINY_CORPUS)},
                                "eval": [{"source": str(TINY_CORPUS), "name": "again"}], "train_sentences": 60, "eval_sentences": 30,
                                "max_length": 24, "decoder": "ridge", "text_metrics_sentences": 5, "cache_dir": str(tmp_path / cache)})

    both = run_probe(*suite([{"source": str(TINY), "pooling": "last", "name": "last"}, {"source": str(TINY), "pooling": "mean", "name": "mean"}],
                            "c1"), out_dir=tmp_path / "both")
    alone = run_probe(*suite([{"source": str(TINY), "pooling": "mean", "name": "mean"}], "c2"), out_dir=tmp_path / "alone")
    timings = both["setup"]["models"]
    assert timings["last"]["timings"]["base"]["cache_hits"] == 0 and timings["last"]["timings"]["load_s"] > 0
    assert timings["mean"]["timings"]["base"]["cache_hits"] == 2 and timings["mean"]["timings"]["load_s"] == 0.0
    mean_rows = [r for r in both["rows"] if r["model"] == "mean"]
    assert len(mean_rows) == len(alone["rows"])
    for a, b in zip(mean_rows, alone["rows"]):
        assert a["recoverability_acc"] == b["recoverability_acc"]
        np.testing.assert_array_equal(a["_acc"], b["_acc"])
    assert any(a["recoverability_acc"] != b["recoverability_acc"]  # the two poolings are different features
               for a, b in zip(mean_rows, [r for r in both["rows"] if r["model"] == "last"]) if a["layer"] > 0)


def test_learning_curve_refits_on_prefixes_and_ends_at_the_probe_itself(tmp_path, capsys):
    res = _tiny_probe(tmp_path, tmp_path / "out", "--decoder", "ridge", "learning_curve=[30,60,500]")
    out = tmp_path / "out"
    saved = json.loads((out / "learning_curve.json").read_text())
    assert (out / "plots" / "learning_curve.png").is_file() and (out / "learning_curve.csv").is_file()
    assert sorted({r["n_train"] for r in saved["rows"]}) == [30, 60, 120]  # 500 > the 120 sentences: dropped; the full set added
    full = {(r["layer"], r["set"]): r["recoverability_acc"] for r in saved["rows"] if r["n_train"] == 120}
    evals = [r for r in res["rows"] if r["role"] == "eval"]
    best = max({r["layer"] for r in evals}, key=lambda l: np.mean([r["recoverability_acc"] for r in evals if r["layer"] == l]))
    assert {layer for layer, _ in full} == {best, 3}  # drawn at the best and the last layer only
    assert full == {(r["layer"], r["set"]): r["recoverability_acc"] for r in evals if r["layer"] in (best, 3)}  # last point = the probe
    small = {(r["layer"], r["set"]): r["recoverability_acc"] for r in saved["rows"] if r["n_train"] == 30}
    assert small.keys() == full.keys() and small != full
    gains = saved["last_step_gain"]
    assert {g["at"] for g in gains} == {"best", "last"} and all(g["from_n"] == 60 and g["to_n"] == 120 for g in gains)
    assert all(g["low"] <= g["estimate"] <= g["high"] for g in gains)
    assert "learning curve: accuracy gained by the last step" in capsys.readouterr().out


# ---- bags stored as ids (large vocabularies) -------------------------------------------------------


def _synthetic_layers(rng, n, V, D, proj):
    """Token id lists (id 0 = a special token) and features (n, 2, D): layer 0 noise, layer 1 a noisy linear image of the bag."""
    seqs = [list(rng.choice(np.arange(2, V), size=rng.integers(4, 10), replace=False)) for _ in range(n)]
    image = np.zeros((n, D))
    for i, s in enumerate(seqs):
        image[i] = proj[s].sum(0)
    layers = [rng.standard_normal((n, D)), image + 0.3 * rng.standard_normal((n, D))]
    return [[0] + [int(t) for t in s] for s in seqs], np.stack(layers, 1).astype(np.float32)


@pytest.mark.parametrize("decoder", ["ridge", "bce"])
def test_sparse_bags_give_the_dense_bags_decoders_and_metrics(decoder):
    """SparseBags (ids per row) is only a storage format: rows, slices, permutations, decoders, BagSets, the tilt tau and
    every per-sentence metric equal those of the dense (N, V) matrix."""
    from mi_tune.decoders import InformationProbe, SparseBags, accuracy_per_sentence, bags_from_ids
    from mi_tune.metrics import bag_token_distribution

    rng = np.random.default_rng(0)
    V = 300
    seqs = [list(rng.integers(0, V, size=rng.integers(0, 12))) for _ in range(80)]  # some empty bags, ids 3, 4 excluded
    D, S = bags_from_ids(seqs, V, [3, 4]), SparseBags.from_ids(seqs, V, [3, 4])
    assert torch.equal(S.dense(), D) and torch.equal(SparseBags.from_dense(D).dense(), D) and S.shape == D.shape
    assert (S.sizes() == 0).any() and torch.equal(SparseBags.from_dense(D).indptr, S.indptr)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(0))
    for index in (perm, slice(0, 17), slice(5, 9)):
        assert torch.equal(S[index].dense(), D[index])
    torch.testing.assert_close(S.token_distribution(), bag_token_distribution(D))
    X = torch.randn(2, 80, 16, generator=torch.Generator().manual_seed(1))
    fit = (lambda Y: fit_ridge(X, Y, "gcv")) if decoder == "ridge" else (lambda Y: fit_bce(X, Y, epochs=3, batch_size=16))
    a, b = fit(D), fit(S)
    for k in ("W", "b", "active", "mean", "std"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    held = [list(rng.integers(0, V + 40, size=rng.integers(0, 12)) % V) for _ in range(40)]  # some ids never seen in training
    D_ev, S_ev = bags_from_ids(held, V, [3, 4]), SparseBags.from_ids(held, V, [3, 4])
    ev_d, ev_s = BagSet.of(D_ev, a.active), BagSet.of(S_ev, a.active)
    assert ev_s.u.sum() > 0 and len(ev_s.unseen_ids) > 0
    for k in ("ya", "u", "unseen_rows", "unseen_ids"):
        assert torch.equal(getattr(ev_d, k).float(), getattr(ev_s, k).float()), k
    assert ev_d.entropy_bits == pytest.approx(ev_s.entropy_bits) and ev_d.max_bag == ev_s.max_bag
    linear = decoder == "ridge"
    p_d, p_s = InformationProbe(a, 1, X[1], BagSet.of(D, a.active), linear), InformationProbe(b, 1, X[1], BagSet.of(S, a.active), linear)
    assert p_d.tau == p_s.tau
    r_d, r_s = p_d.per_sentence(X[1][:40], ev_d), p_s.per_sentence(X[1][:40], ev_s)
    for k in r_d:
        torch.testing.assert_close(r_d[k], r_s[k], equal_nan=True)
    # the control task's accuracy-only path: the same accuracy as the full probe's, without calibrating q
    torch.testing.assert_close(accuracy_per_sentence(b, 1, X[1][:40], ev_s, linear), r_s["acc"], equal_nan=True)


def test_probe_at_gemma_vocabulary_size_stays_small(tmp_path):
    """|V| = 262,144 (Gemma-3), 2,000 training sentences, control task on: dense (N, V) bags would take 2 GB as float32
    for the decoder's targets and 2 GB more for the control's (the old code peaked at 20 GB on the real suite). With bags
    stored as ids the whole probe stays under 1.5 GB resident (measured in a fresh process by its own VmHWM: ru_maxrss
    would carry over the size of the pytest process that forked it), and it still decodes."""
    import inspect
    import os
    import subprocess
    import sys

    script = tmp_path / "probe_big_vocab.py"
    script.write_text(f"""
import json, numpy as np
import torch
torch.set_num_threads(1)
{inspect.getsource(_synthetic_layers)}
from mi_tune.eval.layer_metrics import probe_layers, scored_set
from mi_tune.eval.suites import ProbeSuite
V, D = 262144, 48
rng = np.random.default_rng(0)
proj = rng.standard_normal((V, D)).astype(np.float32)
(tr, trX), (ev, evX) = [_synthetic_layers(rng, n, 80, D, proj[:80]) for n in (2000, 200)]  # ids 2..79 of the big vocabulary
sets = [scored_set("train", "train", tr, V, [0]), scored_set("ev", "eval", ev, V, [0])]
rows = probe_layers({{"train": trX, "ev": evX}}, sets, [0, 1], V, ProbeSuite(decoder="ridge", control_task=True, text_metrics_sentences=0))
by = {{(r["layer"], r["set"]): r for r in rows}}
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this process's own peak
print(json.dumps({{"rss_gb": hwm_kb / 2**20, "acc": by[1, "ev"]["recoverability_acc"],
                  "sel": by[1, "ev"]["selectivity"]}}))
""")
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rss_gb"] < 1.5, res
    assert res["acc"] > 0.8 and res["sel"] > 0.6, res


def test_in_sample_rows_are_scored_on_a_capped_prefix_and_held_out_rows_do_not_change():
    """train_score_sentences caps only the in-sample scoring: decoders (fitted on all training sentences), held-out rows
    and the control's held-out accuracy are identical with and without the cap; the training row says how many it scored."""
    from mi_tune.eval.layer_metrics import probe_layers, scored_set
    from mi_tune.eval.suites import ProbeSuite

    rng = np.random.default_rng(0)
    V, D = 80, 48
    proj = rng.standard_normal((V, D))
    (tr, trX), (ev, evX) = _synthetic_layers(rng, 400, V, D, proj), _synthetic_layers(rng, 150, V, D, proj)
    sets = [scored_set("train", "train", tr, V, [0]), scored_set("ev", "eval", ev, V, [0])]
    run = lambda cap: {(r["layer"], r["set"]): r for r in probe_layers(  # noqa: E731
        {"train": trX, "ev": evX}, sets, [0, 1], V, ProbeSuite(decoder="ridge", control_task=True, text_metrics_sentences=0,
                                                               train_score_sentences=cap))}
    full, capped = run(None), run(120)
    for layer in (0, 1):
        assert full[layer, "train"]["sentences"] == 400 and capped[layer, "train"]["sentences"] == 120
        np.testing.assert_array_equal(full[layer, "train"]["_acc"][:120], capped[layer, "train"]["_acc"])  # the same sentences, same scores
        np.testing.assert_array_equal(full[layer, "train"]["_control_acc"][:120], capped[layer, "train"]["_control_acc"])
        for k in ("_acc", "_control_acc", "_prior"):
            np.testing.assert_array_equal(full[layer, "ev"][k], capped[layer, "ev"][k])
    assert capped[1, "train"]["recoverability_acc"] > 0.8
