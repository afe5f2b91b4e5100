"""The probe's per-layer metrics: pure functions from features, bags and decoders to rows of numbers (no files,
no tracking). ``probe_layers`` fits one decoder per layer and scores every set; ``summarize`` and
``adapter_deltas`` turn the rows into best-vs-last-layer and adapter-vs-base comparisons with intervals.

Metrics per layer and data set (DESIGN.md section 2):
- ``recoverability_acc``: precision@k of the decoder's top-k vocabulary ids, k = bag size (unique
  non-special tokens of the sentence), mean over sentences.
- ``cosine``: cosine between predicted probabilities (sigmoid for BCE, scores clipped to [0, 1] for
  ridge) and the multi-hot bag, over the full vocabulary, mean over sentences.
- ``bleu`` (sacrebleu corpus BLEU, 0-100, tokenize="none") and ``rouge1_f`` / ``rouge2_f`` (rouge-score
  F1, mean over sentences) of the *recovered token list* against the *original tokens*:
  original = the sentence's token ids after truncation, special tokens removed, in sentence order,
  repeats kept; recovered = the top-k ids (k = bag size) with the hits (ids that occur in the sentence)
  placed in the order of their first occurrence, followed by the misses. Tokens are written as decimal
  ids, so nothing is detokenised or re-tokenised. A bag has no order, so this is an *oracle order* for
  the hits: BLEU's 2- to 4-grams measure runs of adjacent recovered tokens. ROUGE-L is not reported:
  under this order the hits are a subsequence of the sentence and the misses never occur in it, so the
  LCS is the number of hits and ROUGE-L equals ROUGE-1 (tests/test_probe.py checks it with rouge-score).
  Computed on the first ``text_metrics_sentences`` sentences of each (already shuffled) set.
- Information in bits (mi_tune/metrics.py has the formulas and assumptions): ``mi_lb_bits``, the only
  quantity called a lower bound on I(T;E), = max(``mi_variational_lb_bits`` (H(T) - held-out cross-entropy
  of the decoder's scores normalised over the vocabulary), ``mi_fano_list_lb_bits`` (Fano for a list of k
  guesses)), H(T) = the set's plug-in bag-token entropy (``token_entropy_bits``); ``mi_fano_uniform_bits``
  is the paper's estimate (H(T) = log2|V|, one guess), not a bound. |V| is the model's full vocabulary.
- ``prior_acc``: the no-feature baseline (ids ranked by training bag frequency).
Intervals: per set, paired bootstrap 95% (mi_tune/stats.py) of best - last layer, of each layer's gain over
the prior at the best and last layer, and of adapter - base at the base's best and last layers.

The decoders are full-vocabulary but stored compactly (mi_tune/decoders.py): one column per id seen in a
training bag and one shared column for the U ids never seen, which all get the same score. The metrics are
computed on that compact form (B x A instead of B x |V|, ~5x less work for SmolLM2); the U tied ids enter
the top-k as a block wherever their shared score ranks. Accuracy counts that block's expected hits under a
random choice among the tied ids (u/U per slot, u = bag ids never seen in training); BLEU/ROUGE count those
slots as misses. Both differ from a dense ``torch.topk`` only in how ties are broken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..decoders import ROW_CHUNK, SparseBags
from .suites import ProbeSuite

DECODER_MEMORY = 1.0e9  # bytes of decoder weights (+ Adam state for BCE) fitted at once; sets the layer chunk

METRICS = {  # key -> axis label (with units); order = plot and table order
    "recoverability_acc": "recoverability accuracy (precision@|bag|, 0-1)",
    "cosine": "cosine(predicted probabilities, bag) (0-1)",
    "bleu": "BLEU of recovered tokens (sacrebleu, 0-100)",
    "rouge1_f": "ROUGE-1 F1 of recovered tokens (0-1)",
    "rouge2_f": "ROUGE-2 F1 of recovered tokens (0-1)",
    "mi_lb_bits": "lower bound on I(T;E): max(variational, list-Fano) (bits)",
    "mi_variational_lb_bits": "variational lower bound H(T) - CE (bits)",
    "mi_fano_list_lb_bits": "list-Fano lower bound, k = largest bag (bits)",
    "mi_fano_uniform_bits": "paper's estimate, H(T)=log2|V| (bits, NOT a bound)",
    "ce_gain_over_prior_bits": "CE gain of q(t|E) over its prior (bits/token, not a bound)",
}


class _Whitespace:
    """rouge-score tokenizer for id strings: split on spaces (its default would also work, but lower-cases and regexes)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def recovered_list(top_ids: list[int], sentence: list[int]) -> list[int]:
    """The recovered token list compared with the sentence by BLEU/ROUGE (see the module docstring).

    top_ids: the decoder's top-k ids in decreasing score. Hits go first, in the order of their first
    occurrence in the sentence; misses follow in score order.
    """
    first = {}
    for pos, t in enumerate(sentence):
        first.setdefault(t, pos)
    hits = sorted((t for t in top_ids if t in first), key=first.__getitem__)
    return hits + [t for t in top_ids if t not in first]


def text_scores(hyps: list[list[int]], refs: list[list[int]]) -> dict:
    """sacrebleu corpus BLEU (0-100) and mean rouge-score F1 of id lists written as decimal strings."""
    if not hyps:  # before the imports: rouge-score pulls in nltk (~4 s)
        return {"bleu": float("nan"), "rouge1_f": float("nan"), "rouge2_f": float("nan")}
    import sacrebleu
    from rouge_score import rouge_scorer

    h = [" ".join(map(str, x)) for x in hyps]
    r = [" ".join(map(str, x)) for x in refs]
    bleu = sacrebleu.corpus_bleu(h, [r], tokenize="none").score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"], tokenizer=_Whitespace())
    sums = {"rouge1": 0.0, "rouge2": 0.0}
    for hyp, ref in zip(h, r):
        for key, s in scorer.score(ref, hyp).items():
            sums[key] += s.fmeasure
    return {"bleu": float(bleu), **{f"{k}_f": v / len(h) for k, v in sums.items()}}


@dataclass
class ScoredSet:
    """What the metrics need about one data set, computed once per model."""

    name: str
    role: str
    seqs: list[list[int]]  # token ids as fed to the model (truncated, with specials)
    sentences: list[list[int]]  # the same without special/pad ids: the "original tokens"
    bags: SparseBags  # (N, V) multi-hot, stored as ids (decoders.SparseBags: |V| = 262,144 would be 1 GB per 4,000 sentences dense)
    entropy_bits: float | None = None  # plug-in H(T) on every text of the set's source (None: on these sentences)


def scored_set(name: str, role: str, seqs: list[list[int]], vocab_size: int, exclude_ids, pool=None) -> ScoredSet:
    """``pool``: token ids of every text of the source; H(T) is estimated on it (the plug-in is biased low, less on more text)."""
    from ..metrics import bag_token_distribution_of_seqs, entropy_bits

    ex = set(exclude_ids)
    sentences = [[t for t in s if t not in ex and 0 <= t < vocab_size] for s in seqs]
    h = entropy_bits(torch.from_numpy(bag_token_distribution_of_seqs(pool, vocab_size, exclude_ids))) if pool else None
    return ScoredSet(name, role, seqs, sentences, SparseBags.from_ids(seqs, vocab_size, exclude_ids), h)


MISS = -1  # written for a top-k slot filled from the tied never-seen block: never in a sentence, so a miss


def score_layer(probe, X: np.ndarray, ss: ScoredSet, bs, text_cap: int | None) -> dict:
    """Metrics of one layer's decoder (an ``InformationProbe``) on features X (N, D) of one set with bags ``bs`` (a BagSet).

    Also returns the per-sentence accuracy under ``_acc`` (for the paired intervals).
    """
    n = X.shape[0]
    cap = n if text_cap is None else min(text_cap, n)
    per = probe.per_sentence(X, bs, keep_top=True)
    active = probe.dec.active.tolist()
    k = (bs.ya.sum(1, dtype=torch.float32) + bs.u).long().tolist()
    hyps = []
    for c, (idx, n_active) in enumerate(per["top"]):
        start = c * ROW_CHUNK
        if start >= cap:
            break
        idx, n_active = idx.tolist(), n_active.tolist()
        for i in range(min(len(idx), cap - start)):
            top = [active[c_] for c_ in idx[i][: n_active[i]]] + [MISS] * (k[start + i] - n_active[i])
            hyps.append(recovered_list(top, ss.sentences[start + i]))
    return {**probe.summary(per, bs), **text_scores(hyps, ss.sentences[:cap]), "_acc": per["acc"].numpy()}


def layer_chunk(decoder: str, d: int, active: int) -> int:
    """How many layers' decoders are fitted at once: as many as fit in DECODER_MEMORY bytes."""
    per_layer = d * (active + 1) * 4 * (4 if decoder == "bce" else 3)  # W and 2 temporaries (ridge); W, grad, 2 Adam moments (BCE)
    return max(1, int(DECODER_MEMORY // per_layer))


def probe_layers(feats: dict[str, np.ndarray], sets: list[ScoredSet], layers: list[int], vocab_size: int, suite: ProbeSuite,
                 timings: dict | None = None, device: torch.device | str | None = None, score_train: bool = True) -> list[dict]:
    """Fit one decoder per layer on the train set (layers in chunks, each chunk in one batched fit) and score every set.

    feats: set name -> (N, L+1, D). Returns one row per (layer, set) with the metrics only. ``device``: where the
    decoders are fitted (default: the CPU; a GPU makes the fit of a 7B model's layers minutes instead of hours).
    The training set's in-sample rows are scored on its first ``suite.train_score_sentences`` sentences (its row's
    ``sentences`` says how many; the decoders are always fitted on all of them); ``score_train=False``: no such rows.
    """
    from ..decoders import BagSet, InformationProbe, accuracy_per_sentence, fit_bce, fit_ridge, prior_per_sentence

    train = next(s for s in sets if s.role == "train")
    Y = train.bags  # (N, V) as SparseBags
    active = len(Y.seen())
    chunk = layer_chunk(suite.decoder, feats[train.name].shape[-1], active)
    linear = suite.decoder == "ridge"
    rows = []
    t_fit = t_score = 0.0

    def fit(X, Y):
        if linear:
            return fit_ridge(X, Y, suite.ridge_lambda, device=device)
        return fit_bce(X, Y, epochs=suite.bce_epochs, lr=suite.bce_lr, weight_decay=suite.bce_weight_decay,
                       batch_size=suite.bce_batch_size, seed=suite.seed, device=device)

    cap = len(train.seqs) if suite.train_score_sentences is None else min(suite.train_score_sentences, len(train.seqs))
    scored = [s for s in sets if s.role != "train"]
    if score_train:  # the in-sample rows on the first ``cap`` training sentences (already shuffled)
        scored.insert(0, train if cap == len(train.seqs) else
                      replace(train, seqs=train.seqs[:cap], sentences=train.sentences[:cap], bags=train.bags.select(slice(0, cap))))
    shuffled, Y_ctrl = {}, None
    if suite.control_task:  # the control's pairing: fixed per set, the same at every layer
        gen = torch.Generator().manual_seed(suite.seed + 7919)
        shuffled = {ss.name: derangement(len(ss.seqs), gen) for ss in sets}  # a capped training set: its first rows
        Y_ctrl = Y.select(shuffled[train.name])  # once, not per chunk of layers
    for c0 in range(0, len(layers), chunk):
        ls = layers[c0: c0 + chunk]
        X = torch.from_numpy(np.ascontiguousarray(feats[train.name][:, ls].transpose(1, 0, 2)))  # (Lc, N, D)
        t = time.perf_counter()
        dec = fit(X, Y)
        ctrl_dec = fit(X, Y_ctrl) if suite.control_task else None
        t_fit += time.perf_counter() - t
        t = time.perf_counter()
        if c0 == 0:
            fit_bags = BagSet.of(train.bags, dec.active, train.entropy_bits)  # same seen ids for every chunk
            bags = {ss.name: fit_bags if ss is train else  # a capped training set: H(T) of all training sentences
                    BagSet.of(ss.bags, dec.active, fit_bags.entropy_bits if ss.role == "train" else ss.entropy_bits) for ss in scored}
            prior = {ss.name: prior_per_sentence(fit_bags.ya, bags[ss.name], vocab_size).numpy() for ss in scored}
            if ctrl_dec is not None:
                ctrl_bags = {ss.name: BagSet.of(Y_ctrl[:len(ss.seqs)] if ss.role == "train" else ss.bags.select(shuffled[ss.name]),
                                                ctrl_dec.active) for ss in scored}
        for j, layer in enumerate(ls):
            probe = InformationProbe(dec, j, feats[train.name][:, layer], fit_bags, linear)
            for ss in scored:
                X_set = feats[ss.name][: len(ss.seqs), layer]
                m = score_layer(probe, X_set, ss, bags[ss.name], suite.text_metrics_sentences)
                if ctrl_dec is not None:  # accuracy only: the control's q is never used, so it is not calibrated
                    c_acc = accuracy_per_sentence(ctrl_dec, j, X_set, ctrl_bags[ss.name], linear).numpy()
                    m.update(control_acc=float(np.nanmean(c_acc)), selectivity=m["recoverability_acc"] - float(np.nanmean(c_acc)),
                             _control_acc=c_acc)
                extra = {"ridge_lambda": float(dec.lam[j])} if dec.lam is not None else {"ridge_lambda": None}
                rows.append({"layer": layer, "set": ss.name, "role": ss.role, "sentences": len(ss.seqs),
                             "text_metric_sentences": len(ss.seqs) if suite.text_metrics_sentences is None else min(suite.text_metrics_sentences, len(ss.seqs)),
                             **m, "prior_acc": float(np.nanmean(prior[ss.name])), "_prior": prior[ss.name], **extra})
        t_score += time.perf_counter() - t
    if timings is not None:
        timings["decoder_fit_s"] = timings.get("decoder_fit_s", 0.0) + t_fit
        timings["metrics_s"] = timings.get("metrics_s", 0.0) + t_score
    return rows


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point: sentence i is paired with the bag of sentence out[i] != i."""
    if n < 2:
        raise ValueError(f"the control task pairs each sentence with another one's bag: needs >= 2 sentences per set, got {n}")
    perm = torch.randperm(n, generator=gen)
    out = torch.empty_like(perm)
    out[perm] = perm.roll(-1)  # a cycle through a random order
    return out


def _per(rows: list[dict], key: str = "_acc") -> dict:
    return {r["layer"]: r[key] for r in rows}


def summarize(rows: list[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Per model variant and evaluation set (plus the mean over evaluation sets): best layer vs last layer.

    Intervals (paired bootstrap over the set's sentences; for the mean over sets, each set resampled on its own
    and the per-set means averaged): best - last layer, and the gain over the no-feature prior at both layers; with the
    control task, also the selectivity (accuracy - control accuracy) at both layers.
    """
    from ..stats import stratified_mean_difference

    out = []
    by_model: dict = {}
    for r in rows:
        by_model.setdefault((r["model"], r["variant"]), []).append(r)
    for (model, variant), rs in by_model.items():
        evals = list(dict.fromkeys(r["set"] for r in rs if r["role"] == "eval"))
        groups = {s: [s] for s in evals}
        if len(evals) > 1:
            groups["mean over eval sets"] = evals
        nb = rs[0]["num_blocks"]
        layers = sorted({r["layer"] for r in rs})
        acc = {s: _per([r for r in rs if r["set"] == s]) for s in evals}  # set -> layer -> (N,)
        prior = {s: next(r["_prior"] for r in rs if r["set"] == s) for s in evals}
        for g, members in groups.items():
            curve = {l: float(np.mean([np.nanmean(acc[s][l]) for s in members])) for l in layers}
            best, last = max(layers, key=lambda l: curve[l]), layers[-1]
            iv = lambda a, b: stratified_mean_difference([a(s) for s in members], [b(s) for s in members], resamples, seed).to_dict()  # noqa: E731
            out.append({"model": model, "variant": variant, "set": g, "best_layer": best, "best_depth": best / nb,
                        "best_acc": curve[best], "last_layer": last, "last_acc": curve[last], "drop_best_to_last": curve[best] - curve[last],
                        "first_acc": curve[layers[0]], "prior_acc": float(np.mean([np.nanmean(prior[s]) for s in members])),
                        "drop_interval": iv(lambda s: acc[s][best], lambda s: acc[s][last]),
                        "best_over_prior": iv(lambda s: acc[s][best], lambda s: prior[s]),
                        "last_over_prior": iv(lambda s: acc[s][last], lambda s: prior[s])})
            if "_control_acc" in rs[0]:  # selectivity (accuracy - control accuracy) at both layers, paired over sentences
                ctrl = {s: _per([r for r in rs if r["set"] == s], "_control_acc") for s in evals}
                train_ctrl = {r["layer"]: r["control_acc"] for r in rs if r["role"] == "train"}
                out[-1].update(selectivity_best=iv(lambda s: acc[s][best], lambda s: ctrl[s][best]),
                               selectivity_last=iv(lambda s: acc[s][last], lambda s: ctrl[s][last]),
                               control_train_acc_best=train_ctrl.get(best), control_train_acc_last=train_ctrl.get(last))
    return out


def adapter_deltas(rows: list[dict], summary: list[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Base + adapter - base, per model and evaluation set, at the base's best layer and at the last layer (paired)."""
    from ..stats import stratified_mean_difference

    out = []
    for s in summary:
        if s["variant"] != "base":
            continue
        rs = [r for r in rows if r["model"] == s["model"] and r["role"] == "eval"]
        members = list(dict.fromkeys(r["set"] for r in rs)) if s["set"] == "mean over eval sets" else [s["set"]]
        per = {(r["variant"], r["set"], r["layer"]): r["_acc"] for r in rs}
        if not any(v == "adapter" for v, _, _ in per):
            continue
        for where, layer in (("best", s["best_layer"]), ("last", s["last_layer"])):
            iv = stratified_mean_difference([per["adapter", m, layer] for m in members], [per["base", m, layer] for m in members],
                                            resamples, seed)
            out.append({"model": s["model"], "set": s["set"], "at": where, "layer": layer, **iv.to_dict()})
    return out


def curve_layers(rows: list[dict]) -> list[int]:
    """The layers a learning curve is drawn at: the best (mean accuracy over the evaluation sets, as ``summarize``
    picks it) and the last layer of one model's rows."""
    ev = [r for r in rows if r["role"] == "eval"]
    layers = sorted({r["layer"] for r in ev})
    mean = lambda l: float(np.mean([np.nanmean(r["_acc"]) for r in ev if r["layer"] == l]))  # noqa: E731
    return sorted({max(layers, key=mean), layers[-1]})


def learning_curve(feats: dict[str, np.ndarray], sets: list[ScoredSet], full_rows: list[dict], vocab_size: int, suite: ProbeSuite,
                   sizes: list[int], device=None) -> list[dict]:
    """The decoders refitted on the first n training sentences for each n in ``sizes`` (features reused), at the best and
    the last layer of ``full_rows`` (the probe's own rows on all training sentences: the curve's last point), scored on
    the evaluation sets: one row per (n, layer, eval set) with accuracy, prior and the per-sentence accuracy ``_acc``.
    Sizes not below the training set are dropped; no control task, no BLEU/ROUGE (accuracy is what the curve is about)."""
    train = next(s for s in sets if s.role == "train")
    layers = curve_layers(full_rows)
    quick = replace(suite, control_task=False, text_metrics_sentences=0)
    keep = lambda r, n: {"n_train": n, "layer": r["layer"], "set": r["set"], "recoverability_acc": r["recoverability_acc"],  # noqa: E731
                         "prior_acc": r["prior_acc"], "_acc": r["_acc"]}
    out = []
    for n in sorted({n for n in sizes if n < len(train.seqs)}):
        sub = replace(train, seqs=train.seqs[:n], sentences=train.sentences[:n], bags=train.bags.select(slice(0, n)))
        sub_feats = {**feats, train.name: feats[train.name][:n]}
        out += [keep(r, n) for r in probe_layers(sub_feats, [sub, *(s for s in sets if s.role == "eval")], layers, vocab_size, quick,
                                                 device=device, score_train=False)]
    return out + [keep(r, len(train.seqs)) for r in full_rows if r["role"] == "eval" and r["layer"] in layers]


def flattening(curve: list[dict], layer: int, resamples: int = 2000, seed: int = 0) -> dict | None:
    """Accuracy gained at ``layer`` by the last step of the curve (largest n vs the one before), mean over evaluation
    sets, with a paired interval over sentences: a gain whose interval includes 0 (or is tiny) means the curve has flattened."""
    from ..stats import stratified_mean_difference

    ns = sorted({r["n_train"] for r in curve})
    if len(ns) < 2:
        return None
    at = {(r["n_train"], r["set"]): r["_acc"] for r in curve if r["layer"] == layer}
    sets = list(dict.fromkeys(s for _, s in at))
    iv = stratified_mean_difference([at[ns[-1], s] for s in sets], [at[ns[-2], s] for s in sets], resamples, seed)
    return {"layer": layer, "from_n": ns[-2], "to_n": ns[-1], **iv.to_dict()}


def curve_flattening(curve: list[dict], summary: list[dict], group: str, seed: int = 0) -> list[dict]:
    """``flattening`` of each base model's curve at its best and its last layer (those of ``summary``'s ``group`` row)."""
    out = []
    for s in summary:
        if s["variant"] != "base" or s["set"] != group:
            continue
        mine = [r for r in curve if r["model"] == s["model"]]
        for at, layer in (("best", s["best_layer"]), ("last", s["last_layer"])):
            if (f := flattening(mine, layer, seed=seed)) is not None:
                out.append({"model": s["model"], "at": at, **f})
    return out
