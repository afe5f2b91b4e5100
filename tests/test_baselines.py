"""Training-free baselines of the downstream comparison: echo embeddings against their definition, the special prefix
of real tokenizers, the base (mean) / base (echo) columns end to end (tiny model), and the suite's field."""

import json

import numpy as np
import pytest
import torch

from mi_tune.errors import UserError
from mi_tune.eval.downstream import load_suite, main

from .conftest import MINILM, ROOT, SMOLLM2, TINY
from .test_downstream import tiny_adapter, tiny_suite, tracked_adapter  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def tiny():
    from mi_tune.config import ModelConfig
    from mi_tune.modeling import load_model

    return load_model(ModelConfig(source=str(TINY)))


def test_echo_pools_the_second_copy_of_the_text(tiny):
    """By hand: [BOS] t1..tn t1..tn through the backbone, mean of the states over the second t1..tn. Texts of different
    lengths share a batch (right padding) and one is cut at max_length first."""
    from mi_tune.embedding import embed_texts, hidden_states, special_prefix_length

    model, tok = tiny.model, tiny.tokenizer
    texts = ["the cat sat", "a much longer sentence about the stock market and the rain in spain today", "sun"]
    max_length, layer = 12, 2
    prefix = special_prefix_length(tok)
    assert prefix == 1  # <s>
    got = embed_texts(model, tok, texts, layer, "echo", max_length, batch_size=3)
    for text, emb in zip(texts, got):
        ids = tok(text, add_special_tokens=True)["input_ids"][:max_length]
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        doubled = torch.tensor([ids + ids[prefix:]])  # (1, 2n - 1)
        with torch.no_grad():
            hs = hidden_states(model, doubled, torch.ones_like(doubled))[layer][0]  # (2n - 1, D)
        want = hs[len(ids):].mean(0).float().numpy()
        np.testing.assert_allclose(emb, want, atol=1e-5, rtol=1e-4)
        single = torch.tensor([ids])
        with torch.no_grad():
            plain = hidden_states(model, single, torch.ones_like(single))[layer][0].mean(0).float().numpy()
        assert np.abs(emb - plain).max() > 1e-3  # echo is not the plain mean (the second copy has seen the whole text)


def test_special_prefix_of_real_tokenizers():
    """SmolLM2's tokenizer adds no BOS (echo doubles the whole text); MiniLM's adds [CLS] (and [SEP] at the end)."""
    from mi_tune.embedding import echo_sequences, special_prefix_length
    from mi_tune.modeling import load_tokenizer
    from mi_tune.sources import resolve_model

    smol = load_tokenizer(resolve_model(SMOLLM2))
    ids = smol("hello world", add_special_tokens=True)["input_ids"]
    assert special_prefix_length(smol) == 0 and smol.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    assert echo_sequences([ids], 0) == ([ids + ids], [2])
    mini = load_tokenizer(resolve_model(MINILM))
    ids = mini("hello world", add_special_tokens=True)["input_ids"]
    assert special_prefix_length(mini) == 1 and mini.convert_ids_to_tokens(ids) == ["[CLS]", "hello", "world", "[SEP]"]
    assert echo_sequences([ids], 1) == ([ids + ids[1:]], [4])


def test_echo_of_a_text_without_tokens_is_its_plain_mean(tiny):
    """An empty text is only its prefix (<s>): there is no second copy, so echo pools the sequence itself, as mean
    pooling does, instead of returning a zero vector."""
    from mi_tune.embedding import echo_sequences, embed_texts

    assert echo_sequences([[1], [1, 5, 6]], 1) == ([[1], [1, 5, 6, 5, 6]], [0, 3])
    echo = embed_texts(tiny.model, tiny.tokenizer, ["", "the cat sat"], 2, "echo", 12)
    mean = embed_texts(tiny.model, tiny.tokenizer, [""], 2, "mean", 12)
    assert np.abs(echo[0]).max() > 1e-3
    np.testing.assert_allclose(echo[0], mean[0], atol=1e-5, rtol=1e-4)


def test_echo_fits_the_doubled_text_in_the_model_positions(tiny, monkeypatch, capsys):
    """An encoder with 512 positions and max_length 400: the text is cut at 256 tokens so that it fits twice; the
    cut is logged. Within the limit nothing changes."""
    from mi_tune.embedding import echo_max_length, embed_texts, position_limit

    assert echo_max_length(400, 1, 512) == 256 and 2 * 256 - 1 <= 512
    assert echo_max_length(256, 1, 512) == 256 and echo_max_length(64, 0, None) == 64
    tok = tiny.tokenizer
    monkeypatch.setattr(tok, "model_max_length", 9)
    assert position_limit(tiny.model, tok) == 9
    text = "a much longer sentence about the stock market and the rain in spain today"
    got = embed_texts(tiny.model, tok, [text], 2, "echo", 12)
    want = embed_texts(tiny.model, tok, [text], 2, "echo", 5)  # (9 + 1) // 2: <s> + 4 tokens, then the 4 again
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert "echo: texts cut at 5 tokens instead of max_length=12" in capsys.readouterr().err


def test_baseline_columns_end_to_end(tiny_suite, tiny_adapter, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--baseline mean --baseline echo: two base-model columns between base and the adapter, the base's load reused,
    intervals vs base and adapter − baseline, the table, and the baselines' scores in a run of their own."""
    client, uri, run = tracked_adapter(tiny_adapter, tmp_path, monkeypatch)
    out = tmp_path / "out"
    main(["--suite", str(tiny_suite), "--model", str(TINY), "--adapter", str(tiny_adapter), "--tasks", "sim,ret", "--out", str(out),
          "--baseline", "mean", "--baseline", "echo", "--tracking-uri", uri, "bootstrap_resamples=200"])
    res = json.loads((out / "results.json").read_text())
    cols = res["columns"]
    assert [(c["label"], c["role"], c["pooling"], c["adapter"]) for c in cols] == [
        ("base", "base", "last", None), ("base (mean)", "baseline", "mean", None), ("base (echo)", "baseline", "echo", None),
        ("tiny-run", "adapter", "last", str(tiny_adapter))]
    assert cols[1]["load_s"] == cols[2]["load_s"] == 0.0  # the base's loaded model is reused
    assert all(c["texts_embedded"] > 0 for c in cols)  # echo's cache key differs from mean's (and from last's)
    table = (out / "table.md").read_text()
    for t in res["tasks"].values():
        main_metric = t["main"]
        assert set(t["interval"]) == {"base (mean)", "base (echo)", "tiny-run"}
        vs = t["interval_vs_baselines"]["tiny-run"]
        assert set(vs) == {"base (mean)", "base (echo)"}
        for b, iv in vs.items():
            assert iv["estimate"] == pytest.approx(t["scores"]["tiny-run"][main_metric] - t["scores"][b][main_metric], abs=1e-12)
            assert iv["n"] == t["bootstrap"]["n"] and iv["resamples"] == 200
    assert res["tasks"]["sim"]["scores"]["base (echo)"] != res["tasks"]["sim"]["scores"]["base (mean)"]
    for needle in ("| base (mean) |", "| base (echo) |", "tiny-run − base (mean)", "tiny-run − base (echo)", "Training-free baselines",
                   "mean over the second copy"):
        assert needle in table, needle
    row = next(line for line in table.splitlines() if line.startswith("| sim ") and "spearman *" in line)
    assert row.count("[") == 5  # Δ of 3 columns vs base, then the adapter − each baseline
    # tracking: the adapter's scores in its training run; base and baselines (no training run) in a run of their own
    assert res["tracking_runs"][0] == run.info.run_id and len(res["tracking_runs"]) == 2
    own = client.get_run(res["tracking_runs"][1]).data.metrics
    assert own["downstream_tiny_base_echo_sim_spearman"] == pytest.approx(res["tasks"]["sim"]["scores"]["base (echo)"]["spearman"])
    assert "downstream_tiny_base_mean_sim_spearman_delta" in own and "downstream_tiny_base_sim_spearman" in own
    assert "downstream_tiny_sim_spearman" in client.get_run(run.info.run_id).data.metrics


def test_mean_baseline_is_skipped_when_every_column_mean_pools(tiny_suite, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The suite's baselines apply unless the CLI names its own; a mean baseline under mean pooling is the base itself."""
    from mi_tune.eval.downstream import evaluate

    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "with-baselines.yaml"
    suite.write_text(tiny_suite.read_text().replace("task: downstream\n", "task: downstream\nbaselines: [mean, echo]\n"))
    res = evaluate(str(TINY), suite=suite, tasks=["ret"], pooling="mean", out_dir=tmp_path / "out", tracking=False)
    assert [(c["label"], c["pooling"]) for c in res["columns"]] == [("base", "mean"), ("base (echo)", "echo")]
    assert "baseline mean: skipped" in capsys.readouterr().err
    assert "interval_vs_baselines" in res["tasks"]["ret"] and res["tasks"]["ret"]["interval_vs_baselines"] == {}
    res = evaluate(str(TINY), suite=suite, tasks=["ret"], pooling="mean", baselines=[], out_dir=tmp_path / "out2", tracking=False)
    assert [c["label"] for c in res["columns"]] == ["base"] and "interval_vs_baselines" not in res["tasks"]["ret"]


def test_suite_rejects_unknown_and_repeated_baselines():
    with pytest.raises(UserError) as e:
        load_suite(ROOT / "eval" / "downstream-cpu.yaml", ["baselines=[bogus]"])
    assert "baselines" in str(e.value) and "'mean', 'echo'" in str(e.value) and "bogus" in str(e.value)
    with pytest.raises(UserError, match="each of mean, echo at most once"):
        load_suite(ROOT / "eval" / "downstream-cpu.yaml", ["baselines=[echo, echo]"])
    assert load_suite(ROOT / "eval" / "downstream-cpu.yaml")[0].baselines == []  # off unless asked for
