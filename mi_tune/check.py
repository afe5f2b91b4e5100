"""The held-out check at the end of training: base vs enhanced, measured the same way.

For each model (base = adapters disabled, enhanced = adapters on) a fresh linear decoder is fitted on frozen
features of the same training sentences and scored on the same held-out sentences: the in-domain held-out
units (document-disjoint from training by default, see data.load_corpus) and every out-of-domain set named
in ``check.ood``. Every set reports the no-feature prior, accuracy, the information quantities of
mi_tune.metrics (valid bounds and the paper's estimate, named apart), and paired bootstrap 95% intervals
(mi_tune.stats) of enhanced - base and of each model's gain over the prior.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .card import run_readme
from .check_report import HELDOUT, check_table, fmt_interval
from .config import DataConfig, Recipe
from .errors import UserError, cli_main, field_error, log
from .runs import METRICS_FILE, README_FILE, RECIPE_FILE, atomic_write


@dataclass
class OodSet:
    name: str
    source: str
    texts: list[str]  # the scored sample
    all_texts: list[str]  # every cleaned unit of the source: H(T) is estimated on all of them (less biased)


def ood_sets(recipe: Recipe) -> list[OodSet]:
    """Read every ``check.ood`` set now (before any training), so a missing or empty one fails fast with exit 2."""
    from .data import read_texts

    out = []
    for i, spec in enumerate(recipe.check.ood):
        spec = {"source": spec} if isinstance(spec, str) else dict(spec)
        what = f"check.ood[{i}]"
        unknown = set(spec) - {"source", "name", "text_field", "split", "config_name"}
        if not spec.get("source") or unknown:
            raise UserError(field_error(what, spec, "a source string, or a mapping with `source` and optional name, text_field, split, "
                                        "config_name", "write e.g. `- ../shared/data/ag_news/test.jsonl`"))
        cfg = DataConfig(source=spec["source"], text_field=spec.get("text_field", "text"), split=spec.get("split", "test"),
                         config_name=spec.get("config_name"), min_words=recipe.data.min_words, unit=recipe.data.unit)
        name = spec.get("name") or Path(spec["source"]).parent.name + "/" + Path(spec["source"]).stem
        texts = read_texts(spec["source"], cfg, what, cfg.split)
        random.Random(f"{recipe.data.shuffle_seed}-{name}").shuffle(texts)  # the data's seed, not training's: seeds score the same sentences
        out.append(OodSet(name, spec["source"], texts[: recipe.check.ood_sentences], texts))
        log(f"check: out-of-domain set {name!r}: {len(out[-1].texts)} of {len(texts)} units from {spec['source']}")
    return out


def base_features(model, tokenizer, corpus, recipe: Recipe, head_cfg, exclude_ids, n_train: int, ood: list[OodSet] = (),
                  location=None) -> dict:
    """Frozen base-model features (adapters disabled) of the check's sentences, computed once before training.

    Returns {set: (seqs, features (1, N, D), bags (N, V) as decoders.SparseBags)} for "train", "heldout" and each out-of-domain set. The same
    base features serve the head's warm start and the base rows of the final check.
    """
    from .decoders import SparseBags
    from .embedding import embed_token_ids, tokenize
    from .eval.cache import cached_array, embedding_key

    s = recipe.check
    splits = [("train", corpus.train[:n_train])]
    if s.enabled:
        splits += [(HELDOUT, corpus.eval[-s.eval_sentences:])] + [(o.name, o.texts) for o in ood]
    out = {}
    for name, texts in splits:
        seqs = tokenize(tokenizer, texts, recipe.data.max_length)

        def compute(seqs=seqs, name=name):
            with model.disable_adapter():
                return embed_token_ids(model, seqs, tokenizer.pad_token_id, [head_cfg.layer], head_cfg.pooling, progress=f"base features ({name})")

        # Same base, texts, layer and pooling -> same features: runs of one recipe (seeds, LRs, the control) share them.
        key = location and embedding_key("train-base-features", location, texts, dtype=str(getattr(model, "dtype", recipe.model.dtype)),
                                         quantization=recipe.model.quantization, layer=head_cfg.layer, pooling=head_cfg.pooling,
                                         max_length=recipe.data.max_length)
        f, hit = cached_array(key, compute, enabled=location is not None)
        if hit:
            log(f"base features ({name}): {len(texts)} sentences from the feature cache")
        out[name] = (seqs, torch.from_numpy(f).transpose(0, 1), SparseBags.from_ids(seqs, head_cfg.vocab_size, exclude_ids))
    return out


def check_pools(tokenizer, corpus, train_seqs, ood: list[OodSet], max_length: int) -> tuple[dict, dict]:
    """What the check needs beside the features: per set, the token ids H(T) is estimated on (in-domain: training +
    held-out units, documents being i.i.d. draws; out-of-domain: every unit of the source), and the split's counts."""
    from .embedding import tokenize

    pools = {HELDOUT: train_seqs + tokenize(tokenizer, corpus.eval, max_length),
             **{o.name: tokenize(tokenizer, o.all_texts, max_length) for o in ood}}
    docs = {k: corpus.stats[k] for k in ("split_by", "train_documents", "eval_documents", "shared_documents")}
    return pools, docs


def heldout_check(model, tokenizer, base: dict, recipe: Recipe, head_cfg, exclude_ids, pools: dict | None = None,
                  prior_seqs=None, documents: dict | None = None) -> dict:
    """Base vs enhanced on every evaluation set; see the module docstring. ``base`` from ``base_features``.

    ``pools``: set -> token id lists of a larger sample of that set's distribution, on which H(T) is estimated (the
    plug-in estimate is biased low, less so on more text); ``prior_seqs``: the training text, whose bag-token
    frequencies are the prior inside q(t|E). Without them, the scored sentences and the decoder's training
    sentences serve.
    """
    from .decoders import BagSet, InformationProbe, fit_bce, fit_ridge, prior_per_sentence
    from .embedding import embed_token_ids
    from .metrics import bag_token_distribution_of_seqs, entropy_bits
    from .stats import paired_mean_difference

    V = head_cfg.vocab_size
    entropy = {name: entropy_bits(torch.from_numpy(bag_token_distribution_of_seqs(seqs, V, exclude_ids)))
               for name, seqs in (pools or {}).items()}
    prior = bag_token_distribution_of_seqs(prior_seqs, V, exclude_ids) if prior_seqs else None
    s = recipe.check
    n_tr = min(s.train_sentences, len(base["train"][0]))
    sets = [k for k in base if k != "train"]
    linear = s.decoder == "ridge"
    per: dict = {}  # (model, set) -> per-sentence tensors
    results: dict = {name: {} for name in sets}
    train_bags = None
    for model_name in ("base", "enhanced"):
        feats = {}
        for split, (seqs, X, Y) in base.items():
            if split == "train":
                seqs, X, Y = seqs[:n_tr], X[:, :n_tr], Y[:n_tr]
            if model_name == "enhanced":
                f = embed_token_ids(model, seqs, tokenizer.pad_token_id, [head_cfg.layer], head_cfg.pooling, progress=f"enhanced features ({split})")
                X = torch.from_numpy(f).transpose(0, 1)  # (1, N, D)
            feats[split] = (X, Y)
        X_tr, Y_tr = feats["train"]
        device = next(model.parameters()).device  # the decoders fit where the model runs (a GPU when there is one); results come back on the CPU
        dec = fit_ridge(X_tr, Y_tr, s.ridge_lambda, device=device) if linear else fit_bce(X_tr, Y_tr, device=device)
        train_bags = BagSet.of(Y_tr, dec.active)
        probe = InformationProbe(dec, 0, X_tr[0], train_bags, linear, prior)
        for name in sets:
            X_ev, Y_ev = feats[name]
            bs = BagSet.of(Y_ev, dec.active, entropy.get(name))
            p = probe.per_sentence(X_ev[0], bs)
            p["prior"] = prior_per_sentence(train_bags.ya, bs, dec.vocab_size)  # same for both models: same training bags
            per[model_name, name] = p
            r = probe.summary(p, bs)
            r["prior_acc"] = float(torch.nanmean(p["prior"]))
            r["gain_over_prior"] = paired_mean_difference(p["acc"], p["prior"], s.bootstrap_resamples, recipe.seed).to_dict()
            r["ce_gain_interval"] = paired_mean_difference(p["ce_prior_bits"], p["ce_bits"], s.bootstrap_resamples, recipe.seed).to_dict()
            results[name][model_name] = r
    for name in sets:
        b, e = per["base", name], per["enhanced", name]
        results[name]["delta_acc"] = paired_mean_difference(e["acc"], b["acc"], s.bootstrap_resamples, recipe.seed).to_dict()
        # H(T) is the same on both sides, so the change of the (unclipped) variational bound is -(change of cross-entropy)
        results[name]["delta_ce_gain_bits"] = paired_mean_difference(-e["ce_bits"], -b["ce_bits"], s.bootstrap_resamples,
                                                                            recipe.seed).to_dict()
        results[name]["sentences"] = int(len(b["acc"]))
        # per sentence, same order in every run of this recipe: what a paired comparison of two runs (adapter vs control) needs
        results[name]["per_sentence"] = {m: {k: [round(float(v), 6) for v in per[m, name][k]] for k in ("acc", "ce_bits")}
                                          for m in ("base", "enhanced")}
    results["setup"] = {"decoder": s.decoder, "train_sentences": n_tr, "layer": head_cfg.layer, "pooling": head_cfg.pooling,
                        "entropy_sentences": {name: len(seqs) for name, seqs in (pools or {}).items()},
                        "prior_sentences": len(prior_seqs) if prior_seqs else n_tr,
                        "vocab_size": head_cfg.vocab_size, "sets": sets, "ood_sample_seed": recipe.data.shuffle_seed, "bootstrap": f"paired, 95% percentile, {s.bootstrap_resamples} "
                        f"resamples of sentences (numpy)", **(documents or {})}
    return results


def flat_metrics(check: dict) -> dict:
    """MLflow metric names: heldout_<model>_<metric> for the in-domain set, ood_<set>_<model>_<metric> for the others."""
    out = {}
    for name in check["setup"]["sets"]:
        prefix = "heldout" if name == HELDOUT else "ood_" + "".join(c if c.isalnum() else "_" for c in name)
        for model in ("base", "enhanced"):
            out.update({f"{prefix}_{model}_{k}": v for k, v in check[name][model].items() if isinstance(v, (int, float))})
        d = check[name]["delta_acc"]
        out.update({f"{prefix}_delta_acc": d["estimate"], f"{prefix}_delta_acc_low": d["low"], f"{prefix}_delta_acc_high": d["high"]})
    return out


def print_check(check: dict) -> None:
    s = check["setup"]
    docs = f" ({s['train_documents']} / {s['eval_documents']} documents, {s['shared_documents']} shared)" if "train_documents" in s else ""
    print(f"\nrecoverability of the embedding (layer {s['layer']}, {s['pooling']} pooling): fresh {s['decoder']} decoder fitted on "
          f"{s['train_sentences']} training sentences of frozen features, scored on held-out sets{docs}")
    for line in check_table(check):
        print("  " + line)
    print(f"  [..]: {s['bootstrap']}; * = the interval excludes 0. CE gain over prior: bits per token the decoder's q(t|E) saves "
          f"over its E-free prior (usable information of a linear decoder; not a bound). MI lower bound = max(H(T) - CE, list-Fano), "
          f"H(T) = plug-in entropy of the set's bag tokens (biased low: 0 means not resolved at this sample size). The paper's "
          f"estimate assumes H(T) = log2|V| and is not a bound.")


def recheck(run_dir: str | Path, verbose: bool = True) -> dict:
    """Recompute a finished run's held-out check with this version of mi_tune (same recipe, split, sentences and seed).

    The previous check stays in metrics.json under ``heldout_check_previous`` (a list, newest last); README.md is
    rewritten. Base features come from the feature cache when the run computed them.
    """
    import torch

    from .config import load_recipe
    from .data import load_corpus
    from .embedding import tokenize
    from .loading import load_ready

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.exists() or not (run_dir / RECIPE_FILE).exists():
        raise UserError(field_error("RUN", str(run_dir), "a finished mi_tune run folder (recipe.yaml and metrics.json)",
                                    "point at adapters/<run> of a run that finished"))
    recipe = load_recipe(run_dir / RECIPE_FILE)
    ood = ood_sets(recipe)
    ready = load_ready(adapter=str(run_dir))
    if ready.head is None:
        raise UserError(field_error("RUN", str(run_dir), "a run folder with head/ (the layer and pooling of the check)",
                                    "re-run the training; the check needs the run's head config"))
    torch.manual_seed(recipe.seed)
    tok = ready.tokenizer
    exclude = set(tok.all_special_ids) | {tok.pad_token_id}
    corpus = load_corpus(recipe.data)
    train_seqs = tokenize(tok, corpus.train, recipe.data.max_length)
    n = max(recipe.check.train_sentences, recipe.head.warm_start_sentences if recipe.head.init == "fit" else 0)
    base = base_features(ready.model, tok, corpus, recipe, ready.head.config, exclude, n, ood, location=ready.loaded.location)
    pools, docs = check_pools(tok, corpus, train_seqs, ood, recipe.data.max_length)
    check = heldout_check(ready.model, tok, base, recipe, ready.head.config, exclude, pools, train_seqs, docs)
    if verbose:
        print_check(check)
    final = json.loads(metrics_path.read_text())
    if "heldout_check" in final:
        final.setdefault("heldout_check_previous", []).append({**final["heldout_check"], "replaced_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    final["heldout_check"] = check
    atomic_write(metrics_path, json.dumps(final, indent=2, default=float))
    atomic_write(run_dir / README_FILE, run_readme(run_dir))
    log(f"check: {metrics_path} updated (the previous check is kept under heldout_check_previous)")
    return check


def compare_checks(run_a: str | Path, run_b: str | Path, resamples: int = 2000, seed: int = 0) -> dict:
    """Enhanced model of run A - enhanced model of run B on every set both checks scored, paired over the same sentences
    (e.g. an adapter vs its LM-only control, or two seeds). Refuses checks that did not score the same sentences."""
    from .stats import paired_mean_difference

    checks = []
    for run in (run_a, run_b):
        path = Path(run) / METRICS_FILE
        chk = json.loads(path.read_text()).get("heldout_check") if path.exists() else None
        if not chk or "per_sentence" not in chk.get(HELDOUT, {}):
            raise UserError(field_error("--against", str(run), "a finished run whose check stored per-sentence scores",
                                        f"run `python -m mi_tune.check {run}` first"))
        checks.append(chk)
    a, b = checks
    # checks written before the out-of-domain sample was drawn with data.shuffle_seed (it used the training seed) lack the key
    old = [str(r) for r, c in zip((run_a, run_b), checks) if "ood_sample_seed" not in c["setup"]]
    keys = ("train_sentences", "layer", "pooling", "decoder", "sets") + (("ood_sample_seed",) if not old else ())
    if any(a["setup"].get(k) != b["setup"].get(k) for k in keys) or any(a[s]["sentences"] != b[s]["sentences"] for s in a["setup"]["sets"]):
        raise UserError(f"--against: {run_a} and {run_b} did not score the same sentences the same way (setup differs in "
                        f"{[k for k in keys if a['setup'].get(k) != b['setup'].get(k)]}). Allowed: two runs of one recipe that differ "
                        f"only in training (seed, objective). Fix: compare runs of the same recipe and check settings.")
    out = {}
    for name in a["setup"]["sets"]:
        pa, pb = a[name]["per_sentence"], b[name]["per_sentence"]
        if pa["base"]["acc"] != pb["base"]["acc"]:
            if old and name != HELDOUT:
                raise UserError(f"--against: the runs scored different {name!r} sentences: the check of {old[0]} may predate "
                                f"out-of-domain samples drawn with data.shuffle_seed (it used the training seed, so two seeds of one "
                                f"recipe drew different sentences). Fix: re-run `python -m mi_tune.check {old[0]}` (same recipe and "
                                f"split; the old check is kept under heldout_check_previous), then compare again.")
            raise UserError(f"--against: the base rows of {name!r} differ between the runs, so they were not scored on the same "
                            f"sentences. Fix: compare runs of the same recipe (data, split and check settings).")
        out[name] = {"delta_acc": paired_mean_difference(pa["enhanced"]["acc"], pb["enhanced"]["acc"], resamples, seed).to_dict(),
                     "delta_ce_gain_bits": paired_mean_difference([-x for x in pa["enhanced"]["ce_bits"]],
                                                                  [-x for x in pb["enhanced"]["ce_bits"]], resamples, seed).to_dict()}
    return out


@cli_main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mi_tune.check",
                                description="Recompute a finished run's held-out check (base vs enhanced, in and out of domain, "
                                            "with intervals) with this version of mi_tune.")
    p.add_argument("run", help="run folder, e.g. adapters/smollm2-135m-cpu")
    p.add_argument("--against", default=None, help="another run of the same recipe (e.g. the LM-only control): print the paired "
                                                    "difference of the two enhanced models instead of recomputing")
    a = p.parse_args(argv)
    if a.against:
        out = compare_checks(a.run, a.against)
        print(f"\n{a.run} − {a.against} (enhanced models, same sentences; paired bootstrap 95% interval, * = excludes 0)")
        for name, d in out.items():
            print(f"  {name:<24} accuracy {fmt_interval(d['delta_acc'])}   CE gain {fmt_interval(d['delta_ce_gain_bits'], 3)} bits/token")
        return out
    return recheck(a.run)


if __name__ == "__main__":
    main(sys.argv[1:])
