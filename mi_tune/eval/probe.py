"""The layer probe: how much of a sentence's tokens a linear decoder recovers from each layer's pooled vector.

    python -m mi_tune.eval eval/probe-cpu.yaml [--data-root DIR] [--out DIR] [key=value ...]
    python -m mi_tune.eval probe --model SRC [--model SRC ...] [--adapter RUN] --train DATA --eval DATA [--eval DATA ...]

Reads top to bottom: settings -> data -> per model: features (one forward pass per batch collects every
layer; cached on disk) -> one decoder per layer (all layers fitted together) -> metrics on the training
set and every evaluation set -> table (CSV + JSON) -> plots over normalized depth l/L -> tracking.

The metrics (recoverability accuracy, cosine, BLEU/ROUGE of the recovered tokens, information in bits, the
no-feature prior) and their intervals are defined and computed in mi_tune/eval/layer_metrics.py; tables and the
printed summary in mi_tune/eval/report.py; figures in mi_tune/plots.py.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import config_from_dict, flatten, load_config, merge, parse_overrides
from ..errors import UserError, field_error, log
from ..modeling import local_device
from ..plots import claims_figure, learning_curve_figure, probe_adapter, probe_metrics
from .claims import claims_table, print_claims, write_claims
from .layer_metrics import METRICS, adapter_deltas, curve_flattening, learning_curve, probe_layers, scored_set, summarize
from .report import print_learning_curve, print_summary, write_learning_curve, write_tables
from .suites import ProbeData, ProbeModel, ProbeSuite, model_label, resolve_data_root

FEATURES_VERSION = "probe-features-v1"  # bump when the feature computation changes (invalidates the cache)


# =============================================================================================
# settings


def suite_from_dict(data: dict, source: str = "probe suite") -> tuple[ProbeSuite, list[ProbeModel], ProbeData, list[ProbeData]]:
    """Validate a suite mapping with the recipe loader (mi_tune.config): every problem is reported at once."""
    suite = config_from_dict(data, ProbeSuite, source)
    return suite, suite.models, suite.train, suite.eval


def load_suite(path: str | Path, overrides: list[str] | None = None) -> tuple[ProbeSuite, list[ProbeModel], ProbeData, list[ProbeData]]:
    """Read a probe suite file; dotted ``key=value`` overrides win over the file."""
    suite = load_config(path, ProbeSuite, overrides, what="suite")
    return suite, suite.models, suite.train, suite.eval


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
    """A model to probe: described without weights (mi_tune.loading.describe_model); weights load only on a cache miss."""

    def __init__(self, spec: ProbeModel):
        from ..loading import describe_model
        from ..modeling import default_pooling

        self.spec = spec
        self.adapter = spec.adapter
        # no source: the adapter's run folder names its base model
        self.info = describe_model(spec.model_config() if spec.source else None, spec.adapter)
        self.cfg = self.info.config
        self.label = spec.name or model_label(self.cfg.source)
        self.kind, self.num_blocks, self.tokenizer = self.info.kind, self.info.num_blocks, self.info.tokenizer
        self.vocab_size = max(self.info.vocab_size, len(self.tokenizer))
        self.pooling = default_pooling(self.kind) if spec.pooling == "auto" else spec.pooling
        tok = self.tokenizer
        self.exclude_ids = sorted(set(tok.all_special_ids) | {tok.pad_token_id})
        self._ready = None
        self.load_s = 0.0

    @property
    def num_hidden_states(self) -> int:
        return self.info.num_hidden_states

    def ready(self):
        if self._ready is None:
            from ..loading import load_ready

            t = time.perf_counter()
            self._ready = load_ready(self.cfg, self.adapter)
            self.load_s = time.perf_counter() - t
        return self._ready

    def features(self, seqs: list[list[int]], adapter_on: bool, batch_size: int, progress: str | None = None,
                 poolings: list[str] | None = None) -> dict[str, np.ndarray]:
        """{pooling: (N, L+1, D)} pooled embeddings of every hidden state for this entry's pooling and ``poolings``
        (other entries probing the same weights), all from one forward pass per batch."""
        from ..embedding import embed_token_ids_multi

        model = self.ready().model
        ctx = model.disable_adapter() if self.adapter and not adapter_on else nullcontext()
        with ctx:
            return embed_token_ids_multi(model, seqs, self.tokenizer.pad_token_id, list(range(self.num_hidden_states)),
                                         list(dict.fromkeys([self.pooling, *(poolings or [])])), batch_size, progress=progress)

    def cache_key(self, adapter_on: bool, ts: TextSet, max_length: int, pooling: str | None = None) -> dict:
        """The feature cache key: the weight files' identity, the exact texts and every setting the features depend on."""
        from .cache import adapter_identity, embedding_key

        return embedding_key(FEATURES_VERSION, self.info.location, ts.texts, adapter=adapter_identity(self.adapter) if adapter_on else None,
                             dtype=str(self.info.dtype), quantization=self.cfg.quantization, pooling=pooling or self.pooling,
                             max_length=max_length, layers="all")

    def resolve_pooling(self, pooling: str) -> str:
        from ..modeling import default_pooling

        return default_pooling(self.kind) if pooling == "auto" else pooling


def same_weights_poolings(models: list[ProbeModel]) -> list[list[str]]:
    """Per entry, the poolings of every entry that probes the same weights (same model block and adapter): with the
    cache on, one forward pass computes (and caches) all of them, so the second pooling of a model costs no pass."""
    key = lambda m: (repr(m.model_config()), m.adapter)  # noqa: E731
    groups: dict = {}
    for m in models:
        groups.setdefault(key(m), []).append(m.pooling)
    return [list(dict.fromkeys(groups[key(m)])) for m in models]


def resolve_layers(spec, handle: ModelHandle) -> list[int]:
    from ..modeling import check_layer

    if spec == "all":
        return list(range(handle.num_hidden_states))
    return sorted({check_layer(int(l), handle.num_hidden_states, handle.cfg.source) for l in spec})


# =============================================================================================
# the run


def _slug(text: str) -> str:
    return re.sub(r"[^\w.\- /:]", "_", text)


def run_probe(suite: ProbeSuite, models: list[ProbeModel], train_spec: ProbeData, eval_specs: list[ProbeData],
              data_root: Path | None = None, out_dir: Path | None = None) -> dict:
    from .cache import cached_array, store_array
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
    curve_rows: list[dict] = []  # the learning curve (suite.learning_curve)
    setup = {"settings": resolved, "data": {ts.name: {**ts.info, "role": ts.role} for ts in text_sets}, "models": {},
             "notes": ["metrics on the training set are in-sample (the decoders were fitted on it)",
                       "BLEU/ROUGE: recovered = top-k ids (k = bag size), hits in order of first occurrence in the sentence, "
                       "misses appended by score; original = the sentence's non-special token ids, in order",
                       "vocab_size is the full vocabulary; the information quantities use it (mi_tune/metrics.py)"]}
    status = "FAILED"
    try:
        for spec, shared in zip(models, same_weights_poolings(models)):
            # ---- model (config + tokenizer; weights only on a cache miss) ----
            t_model = time.perf_counter()
            h = ModelHandle(spec)
            siblings = [p for p in dict.fromkeys(h.resolve_pooling(p) for p in shared) if p != h.pooling] if suite.cache else []
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

                    def compute(ts=ts, h=h, adapter_on=adapter_on) -> np.ndarray:
                        out = h.features(seqs[ts.name], adapter_on, suite.batch_size, f"{h.label} {variant}: {ts.name}", siblings)
                        for p in siblings:  # other entries' poolings of the same pass: their features cost no pass of their own
                            store_array(h.cache_key(adapter_on, ts, suite.max_length, p), out[p], cache_folder)
                        return out[h.pooling]

                    feats[ts.name], hit = cached_array(h.cache_key(adapter_on, ts, suite.max_length), compute, enabled=suite.cache,
                                                       folder=cache_folder)
                    timings["features_s"] += time.perf_counter() - t
                    timings["cache_hits"] += int(hit)
                    log(f"{h.label} [{variant}] {ts.name}: features {feats[ts.name].shape} "
                        f"{'from the cache' if hit else f'computed in {time.perf_counter() - t:.1f} s'}")
                # ---- decoders + metrics ----
                vrows = probe_layers(feats, sets, layers, h.vocab_size, suite, timings, device=local_device())
                for r in vrows:
                    r.update({"model": h.label, "variant": variant, "kind": h.kind, "pooling": h.pooling, "decoder": suite.decoder,
                              "num_blocks": h.num_blocks, "depth": r["layer"] / h.num_blocks, "vocab_size": h.vocab_size,
                              "source": h.cfg.source, "adapter": h.adapter if adapter_on else None})
                    tracker.log_metrics({_slug(f"{h.label}.{variant}/{r['set']}/{k}"): r[k] for k in METRICS}, step=r["layer"])
                rows.extend(vrows)
                log(f"{h.label} [{variant}]: decoders {timings['decoder_fit_s']:.1f} s, metrics {timings['metrics_s']:.1f} s")
                if suite.learning_curve and variant == "base":
                    t = time.perf_counter()
                    for r in learning_curve(feats, sets, vrows, h.vocab_size, suite, suite.learning_curve, device=local_device()):
                        curve_rows.append({"model": h.label, "kind": h.kind, "pooling": h.pooling, "num_blocks": h.num_blocks,
                                           "depth": r["layer"] / h.num_blocks, **r})
                    timings["learning_curve_s"] = time.perf_counter() - t
                    log(f"{h.label}: learning curve ({len(suite.learning_curve)} sizes) in {timings['learning_curve_s']:.1f} s")
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
        flat = curve_flattening(curve_rows, summary, "mean over eval sets" if len(eval_sets) > 1 else eval_sets[0].name, suite.seed)
        if curve_rows:
            write_learning_curve(out_dir, curve_rows, flat)
        title = f"{suite.decoder} decoder trained on {train_set.name}"
        plots = probe_metrics(out_dir, rows, set_names, title, METRICS)
        if curve_rows:
            plots.append(learning_curve_figure(out_dir, curve_rows))
        claims = claims_table(rows, seed=suite.seed)  # the paper's three claims per encoder/decoder pair (notes only when none)
        write_claims(out_dir, claims)
        plots.append(claims_figure(out_dir, rows))
        for label in dict.fromkeys(r["model"] for r in rows if r["variant"] == "adapter"):
            plots.append(probe_adapter(out_dir, rows, label, set_names, METRICS))
        for p in [out_dir / "probe.csv", out_dir / "probe.json", out_dir / "claims.md", out_dir / "claims.json", *plots]:
            tracker.log_artifact(p, "probe" if p.suffix != ".png" else "probe/plots")
        attach_to_training_runs(rows, models, out_dir, suite.name, plots)
        print_summary(summary, deltas)
        if flat:
            print_learning_curve(flat)
        print_claims(claims)
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


def _overrides(a) -> list[str]:
    """The dotted key=value overrides, then --no-cache and --tracking as the overrides they stand for (so they win)."""
    return [*a.overrides, *(["cache=false"] if a.no_cache else []), *(["tracking.enabled=true"] if a.tracking else [])]


def run_suite_file(path: str | Path, argv: list[str] | None = None) -> dict:
    """python -m mi_tune.eval SUITE.yaml [--data-root DIR] [--out DIR] [--no-cache] [--tracking] [key=value ...]"""
    p = argparse.ArgumentParser(prog=f"python -m mi_tune.eval {path}", description="Run a probe suite file.")
    _common_args(p)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval_sentences=100 decoder=ridge")
    a = p.parse_intermixed_args(argv or [])
    suite, models, train, evals = load_suite(path, _overrides(a))
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
    data = merge(data, parse_overrides(_overrides(a)))
    suite, models_, train, evals = suite_from_dict(data, source="probe arguments")
    return run_probe(suite, models_, train, evals, resolve_data_root(suite, a.data_root), a.out)


if __name__ == "__main__":
    from ..errors import cli_main

    cli_main(main)(sys.argv[1:])
