"""The paper's three claims about layer-wise token recoverability, tested on the probe's rows (base models, eval sets):

- C1 "encoders keep more": per (encoder E, decoder D), at each model's last probed layer, the mean over eval sets of
  the per-sentence (acc_E - prior_E) - (acc_D - prior_D). Gains over each model's own no-feature prior, because the
  tokenizers (so the bags and the chance levels) differ; the raw accuracy difference is kept too, without a verdict.
- C2 "encoders decline gently": per pair, drop_D - drop_E, drop = acc(peak layer) - acc(last layer).
- C3 "decoders rise then forget": per decoder, rise = acc(p) - acc(first layer), forget = acc(p) - acc(last), p = the
  best INTERIOR layer (on the even sentences): if the last layer is really the best, forget < 0 and the claim fails.

Selection bias: a model's peak is the argmax of its mean accuracy (mean over eval sets) on the even-indexed sentences
(0, 2, 4, ...) of each set; C2 and C3 are measured on the odd-indexed ones only, so the noise that made a layer the
peak does not inflate its drop. Every model scores the same eval sentences in the same order (the same texts,
tokenized per model), so two models' per-sentence arrays are paired. Intervals: ``stratified_mean_difference``
(paired bootstrap 95%, each eval set resampled on its own). Verdict of an effect: "holds" when the interval's low end
is > 0, "does not hold" when its high end is < 0, else "not resolved by the data". The intervals resample the
evaluation sentences only: they are conditional on the fitted decoders (training sample, ridge penalty), and each of
the many comparisons of a suite is at 95% on its own (no correction for multiple comparisons).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..check_report import fmt_interval
from ..stats import LEVEL, stratified_mean_difference

HOLDS, FAILS, OPEN = "holds", "does not hold", "not resolved by the data"
STATEMENTS = {"C1": "encoders keep more than decoders (gain over the prior, last layer)",
              "C2": "encoders decline less than decoders from their peak to the last layer",
              "C3": "decoders rise then forget (interior peak)"}
EVEN, ODD = slice(0, None, 2), slice(1, None, 2)  # peak chosen on EVEN sentences; C2 and C3 measured on ODD ones


@dataclass
class Curves:
    """One base model on the eval sets: per-sentence accuracy ``acc[set][layer]`` (N,), prior ``prior[set]`` (N,),
    control accuracy ``control[set][layer]`` (N,) when the suite ran the control task."""

    model: str
    kind: str
    num_blocks: int
    sets: list[str]
    layers: list[int]
    acc: dict
    prior: dict
    control: dict | None

    def at(self, layer: int, half: slice = slice(None)) -> list[np.ndarray]:
        return [self.acc[s][layer][half] for s in self.sets]

    @property
    def last(self) -> int:
        return self.layers[-1]

    def _even_mean(self, layer: int) -> float:
        return float(np.mean([np.nanmean(a) for a in self.at(layer, EVEN)]))

    @cached_property
    def peak(self) -> int:
        """The layer of highest mean accuracy on the even-indexed sentences (the first such layer on a tie)."""
        return max(self.layers, key=self._even_mean)

    @cached_property
    def inner_peak(self) -> int | None:
        """The best INTERIOR layer on the even-indexed sentences (None with fewer than 3 layers): C3's candidate peak, so
        that a curve whose even half happens to peak at an edge is still tested (and fails only if the edge is clearly higher)."""
        inner = self.layers[1:-1]
        return max(inner, key=self._even_mean) if inner else None


def model_curves(rows: list[dict]) -> list[Curves]:
    """The base variant's eval-set rows, one ``Curves`` per model (in row order)."""
    rows = [r for r in rows if r["variant"] == "base" and r["role"] == "eval"]
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == m]
        sets = list(dict.fromkeys(r["set"] for r in rs))
        prior = {s: np.asarray(next(r["_prior"] for r in rs if r["set"] == s), dtype=np.float64) for s in sets}
        control = _by_layer(rs, sets, "_control_acc") if all("_control_acc" in r for r in rs) else None
        out.append(Curves(m, rs[0]["kind"], int(rs[0]["num_blocks"]), sets, sorted({int(r["layer"]) for r in rs}),
                          _by_layer(rs, sets, "_acc"), prior, control))
    return out


def _by_layer(rows: list[dict], sets: list[str], key: str) -> dict:
    """set -> layer -> the per-sentence array ``key`` (N,)."""
    return {s: {int(r["layer"]): np.asarray(r[key], dtype=np.float64) for r in rows if r["set"] == s} for s in sets}


def _paired(a: Curves, b: Curves) -> None:
    sizes = lambda c: [(s, len(c.prior[s])) for s in c.sets]  # noqa: E731  (set order matters: sets are paired by position)
    if sizes(a) != sizes(b):
        raise ValueError(f"claims: {a.model!r} and {b.model!r} were scored on different eval sentences ({sizes(a)} vs {sizes(b)}); "
                         "a paired comparison needs the same sets, sentences and order for every model: probe them in one suite")


def verdict(interval: dict) -> str:
    """holds: low end > 0; does not hold: high end < 0; else not resolved."""
    if interval["low"] > 0:
        return HOLDS
    return FAILS if interval["high"] < 0 else OPEN


def _info(c: Curves, iv) -> dict:
    """A model's layers (first, peak, last) and, with the control task, its selectivity at the last layer."""
    sel = iv(c.at(c.last), [c.control[s][c.last] for s in c.sets]) if c.control else None
    return {"model": c.model, "kind": c.kind, "num_blocks": c.num_blocks, "sets": c.sets, "first_layer": c.layers[0],
            "peak_layer": c.peak, "peak_depth": c.peak / c.num_blocks, "last_layer": c.last, "last_depth": c.last / c.num_blocks,
            "selectivity_last": sel}


def claims_table(rows: list[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """C1 and C2 per (encoder, decoder) pair, C3 per decoder; ``{"claim": "note", "note": ...}`` entries say what could not be tested."""
    iv = lambda after, before: stratified_mean_difference(after, before, resamples, seed).to_dict()  # noqa: E731
    minus = lambda xs, ys: [x - y for x, y in zip(xs, ys)]  # noqa: E731
    curves = model_curves(rows)
    if not curves:
        return [{"claim": "note", "note": "no base-model rows on an evaluation set: no claim can be tested"}]
    info = {c.model: _info(c, iv) for c in curves}
    encoders = [c for c in curves if c.kind == "encoder"]
    decoders = [c for c in curves if c.kind == "decoder"]
    out = []
    if not encoders or not decoders:
        out.append({"claim": "note", "note": f"C1, C2 compare encoders with decoders; the base models here are "
                    f"{len(encoders)} encoder(s) and {len(decoders)} decoder(s), so they are not tested"})
    halves = all(len(p) >= 2 for c in curves for p in c.prior.values())
    if not halves:
        out.append({"claim": "note", "note": "C2, C3 need at least 2 sentences per eval set (peak on the even, effect on the odd ones)"})
    for e in encoders:
        for d in decoders:
            _paired(e, d)
            pair = {"encoder": e.model, "decoder": d.model, "sets": e.sets, "models": [info[e.model], info[d.model]]}
            gain = iv(minus(e.at(e.last), [e.prior[s] for s in e.sets]), minus(d.at(d.last), [d.prior[s] for s in d.sets]))
            out.append({"claim": "C1", "statement": STATEMENTS["C1"], **pair, "effect": gain, "verdict": verdict(gain),
                        "raw_acc_difference": iv(e.at(e.last), d.at(d.last))})
            if halves:
                drop_e, drop_d = minus(e.at(e.peak, ODD), e.at(e.last, ODD)), minus(d.at(d.peak, ODD), d.at(d.last, ODD))
                zeros = [np.zeros_like(x) for x in drop_e]
                effect = iv(drop_d, drop_e)
                out.append({"claim": "C2", "statement": STATEMENTS["C2"], **pair, "effect": effect, "verdict": verdict(effect),
                            "encoder_drop": iv(drop_e, zeros), "decoder_drop": iv(drop_d, zeros)})
    for d in decoders if halves and any(c.inner_peak is not None for c in decoders) else []:
        peak = d.inner_peak
        if peak is None:
            continue
        rise, forget = iv(d.at(peak, ODD), d.at(d.layers[0], ODD)), iv(d.at(peak, ODD), d.at(d.last, ODD))
        rv, fv = verdict(rise), verdict(forget)
        both = HOLDS if rv == fv == HOLDS else FAILS if FAILS in (rv, fv) else OPEN
        out.append({"claim": "C3", "statement": STATEMENTS["C3"], "decoder": d.model, "sets": d.sets,
                    "models": [{**info[d.model], "inner_peak_layer": peak, "inner_peak_depth": peak / d.num_blocks}],
                    "interior_peak": d.layers[0] < d.peak < d.last, "rise": rise, "rise_verdict": rv, "forget": forget,
                    "forget_verdict": fv, "verdict": both})
    return out


# ---------------------------------------------------------------------------------------------
# table


def _effect_cell(c: dict) -> str:
    if c["claim"] == "C1":
        return f"gain_E − gain_D = {fmt_interval(c['effect'])}; raw acc_E − acc_D = {fmt_interval(c['raw_acc_difference'])}"
    if c["claim"] == "C2":
        return (f"drop_D − drop_E = {fmt_interval(c['effect'])}; drop_E = {fmt_interval(c['encoder_drop'])}, "
                f"drop_D = {fmt_interval(c['decoder_drop'])}")
    return f"rise = {fmt_interval(c['rise'])} ({c['rise_verdict']}); forget = {fmt_interval(c['forget'])} ({c['forget_verdict']})"


def _pair_cell(c: dict) -> str:
    if c["claim"] == "C1":
        return " vs ".join(f"{m['model']} ({m['kind']}, layer {m['last_layer']})" for m in c["models"])
    if c["claim"] == "C3":
        return " vs ".join(f"{m['model']} ({m['kind']}, best interior layer {m['inner_peak_layer']}/{m['num_blocks']}, l/L "
                           f"{m['inner_peak_depth']:.2f}; overall peak layer {m['peak_layer']})" for m in c["models"])
    return " vs ".join(f"{m['model']} ({m['kind']}, peak layer {m['peak_layer']}/{m['num_blocks']}, l/L {m['peak_depth']:.2f})"
                       for m in c["models"])


def render_claims(claims: list[dict]) -> str:
    """claims.md: the table (claim | model pair | effect [95% interval] | verdict [| selectivity]) and the notes."""
    rows = [c for c in claims if c["claim"] != "note"]
    control = any(m["selectivity_last"] for c in rows for m in c["models"])
    header = ["claim", "model pair", "effect [95% interval]", "verdict"] + (["selectivity at the last layer [95% interval]"] if control else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in rows:
        cells = [f"{c['claim']}: {c['statement']}", _pair_cell(c), _effect_cell(c), f"**{c['verdict']}**"]
        if control:
            cells.append("; ".join(f"{m['model']}: {fmt_interval(m['selectivity_last'])}" for m in c["models"] if m["selectivity_last"]))
        lines.append("| " + " | ".join(cells) + " |")
    first = next((c.get("effect", c.get("rise")) for c in rows), {"level": LEVEL, "resamples": 0})
    notes = [
        "acc = recoverability accuracy per sentence of the evaluation sets (base models only), prior = the no-feature prior's "
        "accuracy on the same sentence. Every model scores the same sentences, so differences are paired per sentence; the "
        f"intervals are paired bootstrap {first['level']:.0%} percentile intervals ({first['resamples']} resamples), each "
        "evaluation set resampled on its own, the effect being the mean over sets; * marks an interval that excludes 0.",
        "C1: gain = acc − prior at each model's last probed layer; the tokenizers and vocabularies differ, so accuracies are "
        "compared as gains over each model's own prior; the raw accuracy difference is shown without a verdict. Even so the "
        "tasks differ (a 30k-token WordPiece bag is not a 262k-token SentencePiece bag): C1 compares what each model "
        "keeps of its own tokens.",
        "C2: drop = acc(peak layer) − acc(last layer); effect = drop_D − drop_E. C3: p = the best interior layer; "
        "rise = acc(p) − acc(first probed layer), forget = acc(p) − acc(last layer); holds only if both hold, does not hold "
        "if either interval is below 0 (e.g. the last layer is clearly the best).",
        "Peak selection (C2, C3): a model's peak layer is the one of highest mean accuracy on the EVEN-indexed sentences "
        "(0, 2, 4, ...) of each evaluation set; C2 and C3 are measured on the ODD-indexed sentences only, so the choice "
        "of the peak does not bias its drop.",
        f"Verdict: {HOLDS} = interval's low end > 0; {FAILS} = high end < 0; {OPEN} = the interval contains 0. "
        "The intervals resample evaluation sentences only (conditional on the fitted decoders), and each comparison is at "
        "95% on its own: with many pairs, expect about one in twenty intervals to miss by chance.",
    ]
    if control:
        notes.append("Selectivity = acc − control acc (the same decoder fitted to other sentences' bags), paired over sentences, "
                     "at each model's last layer.")
    notes += [c["note"] for c in claims if c["claim"] == "note"]
    return "\n".join(lines) + "\n\nNotes.\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_claims(out_dir: Path, claims: list[dict]) -> tuple[Path, Path]:
    """claims.json (the list as is) and claims.md (``render_claims``) in ``out_dir``."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "claims.json", out_dir / "claims.md"
    json_path.write_text(json.dumps(claims, indent=1))
    md_path.write_text("# The paper's claims, per model pair\n\n" + render_claims(claims))
    return json_path, md_path


def print_claims(claims: list[dict]) -> None:
    print("\nthe paper's claims (encoders keep more; encoders decline gently; decoders rise then forget), per model pair:")
    print(render_claims(claims))
