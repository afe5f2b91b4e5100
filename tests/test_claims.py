"""The claims (mi_tune.eval.claims) on synthetic probe rows whose truth is known: per-sentence accuracies = a chosen curve
over layers + a per-sentence difficulty shared by the layers + noise, 2 evaluation sets of 200 sentences, seeded."""

import json

import numpy as np
import pytest

from mi_tune.eval.claims import FAILS, HOLDS, OPEN, claims_table, print_claims, write_claims
from mi_tune.plots import claims_figure

SETS = ("ag_news", "imdb")
N = 200
RESAMPLES = 300
ENCODER = [0.78, 0.83, 0.87, 0.84, 0.83, 0.82, 0.81]  # high and flat, a gentle decline (6 blocks)
DECODER = [0.30, 0.45, 0.55, 0.62, 0.65, 0.60, 0.52, 0.45, 0.40]  # rise then forget (8 blocks)


def model_rows(model: str, kind: str, curve: list[float], seed: int, even_curve: list[float] | None = None,
               control: bool = False) -> list[dict]:
    """Base-model rows on both eval sets, plus a train-set row and an adapter row that the claims must ignore.

    ``even_curve``: the curve of the even-indexed sentences (default: ``curve`` for all of them)."""
    rng = np.random.default_rng(seed)
    rows = []
    nb = len(curve) - 1
    for s in SETS:
        difficulty = rng.normal(0, 0.05, N)  # (N,) a sentence's own difficulty, shared by every layer
        prior = np.clip(0.1 + rng.normal(0, 0.02, N), 0, 1)  # (N,)
        for layer, a in enumerate(curve):
            acc = np.clip(a + difficulty + rng.normal(0, 0.05, N), 0, 1)  # (N,)
            if even_curve is not None:
                acc[0::2] += even_curve[layer] - a
            r = {"model": model, "variant": "base", "kind": kind, "pooling": "mean", "num_blocks": nb, "layer": layer,
                 "depth": layer / nb, "set": s, "role": "eval", "recoverability_acc": float(acc.mean()),
                 "prior_acc": float(prior.mean()), "_acc": acc, "_prior": prior}
            if control:
                c = np.clip(0.1 + rng.normal(0, 0.03, N), 0, 1)
                r.update(_control_acc=c, control_acc=float(c.mean()), selectivity=float(acc.mean() - c.mean()))
            rows.append(r)
            rows.append({**r, "variant": "adapter", "_acc": np.zeros(N)})
    rows.append({**rows[0], "set": "dbpedia", "role": "train", "_acc": np.ones(N), "_prior": np.zeros(N)})
    return rows


def by_claim(claims: list[dict]) -> dict:
    return {(c["claim"], c.get("encoder"), c["decoder"]): c for c in claims if c["claim"] != "note"}


def test_claims_hold_when_encoders_keep_more_and_decoders_forget():
    rows = (model_rows("enc-a", "encoder", ENCODER, 1) + model_rows("enc-b", "encoder", [a - 0.05 for a in ENCODER], 2)
            + model_rows("dec-a", "decoder", DECODER, 3) + model_rows("dec-b", "decoder", [a - 0.1 for a in DECODER], 4))
    claims = claims_table(rows, resamples=RESAMPLES)
    got = by_claim(claims)
    assert sorted(got) == sorted([(c, e, d) for c in ("C1", "C2") for e in ("enc-a", "enc-b") for d in ("dec-a", "dec-b")]
                                 + [("C3", None, "dec-a"), ("C3", None, "dec-b")])
    assert all(c["verdict"] == HOLDS for c in got.values())
    c1 = got["C1", "enc-a", "dec-a"]
    assert c1["effect"]["estimate"] == pytest.approx(0.81 - 0.40, abs=0.02)  # gains over equal priors: the accuracy gap
    assert c1["raw_acc_difference"]["estimate"] == pytest.approx(0.41, abs=0.02) and c1["effect"]["n"] == 2 * N
    c2 = got["C2", "enc-a", "dec-a"]
    assert c2["effect"]["n"] == N  # the odd half of each set
    assert c2["decoder_drop"]["estimate"] == pytest.approx(0.25, abs=0.02)
    assert c2["encoder_drop"]["estimate"] == pytest.approx(0.06, abs=0.02) and c2["encoder_drop"]["low"] > 0
    assert c2["effect"]["estimate"] == pytest.approx(c2["decoder_drop"]["estimate"] - c2["encoder_drop"]["estimate"])
    enc, dec = c2["models"]
    assert (enc["peak_layer"], enc["last_layer"], dec["peak_layer"], dec["last_layer"]) == (2, 6, 4, 8)
    assert dec["peak_depth"] == 0.5 and dec["selectivity_last"] is None
    c3 = got["C3", None, "dec-a"]
    assert c3["interior_peak"] and c3["rise_verdict"] == c3["forget_verdict"] == HOLDS
    assert c3["rise"]["estimate"] == pytest.approx(0.35, abs=0.02)


def test_claims_do_not_hold_when_decoders_keep_more():
    rows = (model_rows("enc", "encoder", [0.3, 0.7, 0.5, 0.3], 1)  # an encoder that peaks and falls steeply
            + model_rows("dec", "decoder", [0.3, 0.45, 0.6, 0.7, 0.8], 2))  # a decoder that only rises
    got = by_claim(claims_table(rows, resamples=RESAMPLES))
    assert [got[k]["verdict"] for k in [("C1", "enc", "dec"), ("C2", "enc", "dec"), ("C3", None, "dec")]] == [FAILS] * 3
    assert got["C1", "enc", "dec"]["effect"]["high"] < 0
    c3 = got["C3", None, "dec"]
    assert not c3["interior_peak"] and c3["models"][0]["peak_layer"] == 4 and c3["models"][0]["inner_peak_layer"] == 3
    # tested at the best interior layer: the last layer is clearly higher, so there is no forgetting at all
    assert c3["rise_verdict"] == HOLDS and c3["forget_verdict"] == FAILS
    assert c3["forget"]["estimate"] == pytest.approx(0.7 - 0.8, abs=0.02) and c3["forget"]["high"] < 0


def test_claims_not_resolved_when_curves_are_the_same():
    flat = [0.5] * 5
    got = by_claim(claims_table(model_rows("enc", "encoder", flat, 1) + model_rows("dec", "decoder", flat, 2), resamples=RESAMPLES))
    for key in [("C1", "enc", "dec"), ("C2", "enc", "dec")]:
        iv = got[key]["effect"]
        assert iv["low"] < 0 < iv["high"] and got[key]["verdict"] == OPEN
    # a flat decoder: wherever noise puts its even-half peak (an edge included), C3 is not resolved, never "does not hold"
    assert got["C3", None, "dec"]["verdict"] == OPEN


def test_peak_is_chosen_on_the_even_sentences():
    """The even half peaks at layer 2, the odd half higher at layer 4 (so all sentences together would pick layer 4):
    layer 2 is reported, and on the odd half it is no better than layer 0 or the last layer, so C3 is not resolved
    (measured on the odd half only)."""
    odd = [0.4, 0.4, 0.4, 0.4, 0.9, 0.4, 0.4]
    even = [0.4, 0.4, 0.7, 0.4, 0.4, 0.4, 0.4]
    claims = claims_table(model_rows("dec", "decoder", odd, 5, even_curve=even), resamples=RESAMPLES)
    (c3,) = [c for c in claims if c["claim"] == "C3"]
    assert c3["models"][0]["peak_layer"] == 2 and c3["interior_peak"]
    assert c3["rise"]["n"] == N and abs(c3["rise"]["estimate"]) < 0.02 and abs(c3["forget"]["estimate"]) < 0.02
    assert c3["rise_verdict"] == c3["forget_verdict"] == c3["verdict"] == OPEN


def test_one_model_gives_no_pair_rows_and_a_note(capsys):
    claims = claims_table(model_rows("dec", "decoder", DECODER, 3), resamples=RESAMPLES)
    assert [c["claim"] for c in claims] == ["note", "C3"]
    assert "0 encoder(s) and 1 decoder(s)" in claims[0]["note"]
    only_enc = claims_table(model_rows("enc", "encoder", ENCODER, 1), resamples=RESAMPLES)
    assert [c["claim"] for c in only_enc] == ["note"]
    assert claims_table([], resamples=RESAMPLES)[0]["claim"] == "note"
    print_claims(only_enc)
    assert "C1, C2 compare encoders with decoders" in capsys.readouterr().out


def test_unpaired_sentences_are_refused():
    enc = model_rows("enc", "encoder", ENCODER, 1)
    for r in enc:
        r["_prior"] = r["_prior"][:-1]
    with pytest.raises(ValueError, match="different eval sentences"):
        claims_table(enc + model_rows("dec", "decoder", DECODER, 3), resamples=RESAMPLES)


def test_files_round_trip_with_the_control(tmp_path):
    rows = model_rows("enc", "encoder", ENCODER, 1, control=True) + model_rows("dec", "decoder", DECODER, 3, control=True)
    claims = claims_table(rows, resamples=RESAMPLES)
    sel = claims[0]["models"][0]["selectivity_last"]
    assert sel["estimate"] == pytest.approx(0.81 - 0.1, abs=0.02) and sel["low"] > 0
    json_path, md_path = write_claims(tmp_path, claims)
    assert (json_path.name, md_path.name) == ("claims.json", "claims.md")
    assert json.loads(json_path.read_text()) == claims
    md = md_path.read_text()
    assert "| claim | model pair | effect [95% interval] | verdict | selectivity at the last layer [95% interval] |" in md
    assert md.count("**holds**") == 3 and "enc (encoder, layer 6) vs dec (decoder, layer 8)" in md
    assert "EVEN-indexed sentences" in md and "ODD-indexed sentences only" in md and "gains over each model's own prior" in md
    assert f"({RESAMPLES} resamples)" in md


@pytest.mark.parametrize("control", [False, True])
def test_claims_figure_is_written(tmp_path, control):
    rows = model_rows("enc", "encoder", ENCODER, 1, control=control) + model_rows("dec", "decoder", DECODER, 3, control=control)
    path = claims_figure(tmp_path, rows)
    assert path == tmp_path / "plots" / "claims_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
