"""How long a probe suite's forward passes take from a cold feature cache, per model, against a time budget.

    python bench/probe_cold.py eval/probe-models.yaml                 # 4 timed batches per model, 30-minute budget
    python bench/probe_cold.py eval/probe-models.yaml --batches 8 --budget-min 30 train_sentences=2000

Per distinct set of weights in the suite (two poolings of one model share one forward pass, as in the probe), it
loads the model (timed), tokenizes every sentence the suite embeds (the training set and every evaluation set, the
suite's max_length), and times the probe's own feature call on ``--batches`` batches spread evenly over the probe's
length-sorted batch order. The feature time of the whole suite is then PROJECTED: measured seconds per padded token
times the suite's padded tokens. It is an estimate from a sample and is printed as one; the decoders, metrics and
learning curve (the warm part, logged by the probe as "decoders .. s, metrics .. s") are not in it. Run it on an
otherwise idle machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def batch_plan(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The probe's batches: indices in the probe's length order, cut into batch_size chunks."""
    from mi_tune.embedding import length_order

    order = length_order(lengths).tolist()
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def spread(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over range(n_items), first and last included (all of them when k >= n_items)."""
    if k >= n_items:
        return list(range(n_items))
    if k == 1:
        return [0]
    return sorted({round(i * (n_items - 1) / (k - 1)) for i in range(k)})


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def project(measured_s: float, measured_tokens: int, total_tokens: int) -> float:
    """Seconds for total_tokens padded tokens at the measured seconds per padded token."""
    return measured_s / measured_tokens * total_tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", help="a probe suite file, e.g. eval/probe-models.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the suite, e.g. train_sentences=2000")
    p.add_argument("--batches", type=int, default=4, help="timed batches per model (spread over the length order)")
    p.add_argument("--budget-min", type=float, default=30.0, help="the time budget to compare the projection with")
    p.add_argument("--data-root", default=None)
    a = p.parse_args(argv)

    import torch

    from mi_tune.embedding import tokenize
    from mi_tune.errors import log
    from mi_tune.eval.probe import ModelHandle, load_suite, read_set, same_weights_poolings
    from mi_tune.eval.suites import resolve_data_root

    suite, models, train_spec, eval_specs = load_suite(a.suite, a.overrides)
    data_root = resolve_data_root(suite, a.data_root)
    sets = [read_set(train_spec, "train", suite.train_sentences, suite, data_root)]
    sets += [read_set(d, "eval", suite.eval_sentences, suite, data_root) for d in eval_specs]
    n_sentences = sum(len(ts.texts) for ts in sets)
    print(f"suite {a.suite}: {len(models)} entries; {n_sentences} sentences per model ({len(sets[0].texts)} training); "
          f"max_length {suite.max_length}, batch {suite.batch_size}; torch threads {torch.get_num_threads()}")

    seen: set = set()
    rows = []
    for spec, shared in zip(models, same_weights_poolings(models)):
        key = (repr(spec.model_config()), spec.adapter)
        if key in seen:  # the probe computes this entry's features in its sibling's pass
            continue
        seen.add(key)
        h = ModelHandle(spec)
        poolings = list(dict.fromkeys(h.resolve_pooling(q) for q in shared))
        seqs = [s for ts in sets for s in tokenize(h.tokenizer, ts.texts, suite.max_length)]
        train_n = len(sets[0].texts)
        lengths = [len(s) for s in seqs]
        t = time.perf_counter()
        h.ready()
        load_s = time.perf_counter() - t
        # per set, as the probe batches them (each set is embedded on its own)
        plans, offset = [], 0
        for ts in sets:
            n = len(ts.texts)
            plans.append([[offset + i for i in b] for b in batch_plan(lengths[offset: offset + n], suite.batch_size)])
            offset += n
        every = [b for plan in plans for b in plan]
        total_tokens = sum(padded_tokens(b, lengths) for b in every)
        train_tokens = sum(padded_tokens(b, lengths) for b in plans[0])
        chosen = [every[i] for i in spread(len(every), a.batches)]
        h.features([seqs[i] for i in chosen[0]], False, suite.batch_size, None, poolings)  # one untimed warm-up batch
        t = time.perf_counter()
        for b in chosen:
            h.features([seqs[i] for i in b], False, suite.batch_size, None, poolings)
        measured_s = time.perf_counter() - t
        measured_tokens = sum(padded_tokens(b, lengths) for b in chosen)
        features_s = project(measured_s, measured_tokens, total_tokens)
        per_train_sentence = project(measured_s, measured_tokens, train_tokens) / max(train_n, 1)
        row = {"model": h.label, "entries": len(poolings), "blocks": h.num_blocks, "load_s": load_s, "timed_batches": len(chosen),
               "padded_tokens": total_tokens, "tokens_per_s": measured_tokens / measured_s, "features_s": features_s,
               "per_train_sentence_s": per_train_sentence, "train_features_s": per_train_sentence * train_n}
        rows.append(row)
        log(f"{h.label}: load {load_s:.0f} s; {measured_tokens} padded tokens in {measured_s:.1f} s "
            f"({row['tokens_per_s']:.0f} tokens/s) -> features of the suite ~{features_s / 60:.1f} min (projected)")
        h._ready = None  # free this model's weights before the next one loads
        del h
        gc.collect()

    total = sum(r["load_s"] + r["features_s"] for r in rows)
    budget = a.budget_min * 60
    print(f"\n| model (poolings sharing the pass) | blocks | load, s | padded tokens | tokens/s (measured, {a.batches} batches) "
          f"| features, min (projected) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} ({r['entries']}) | {r['blocks']} | {r['load_s']:.0f} | {r['padded_tokens']:,} | {r['tokens_per_s']:.0f} "
              f"| {r['features_s'] / 60:.1f} |")
    print(f"\nprojected cold forward passes + loads: {total / 60:.1f} min against a budget of {a.budget_min:.0f} min "
          f"({'within' if total <= budget else 'OVER'}; decoders and metrics come on top)")
    fixed = sum(r["load_s"] + r["features_s"] - r["train_features_s"] for r in rows)
    per_sentence = sum(r["per_train_sentence_s"] for r in rows)
    fits = int(max(budget - fixed, 0) / per_sentence) if per_sentence > 0 else 0
    print(f"training sentences whose forward passes (with the evaluation sets and loads) fit the budget: ~{fits:,} "
          f"(the suite uses {len(sets[0].texts):,})")
    return {"rows": rows, "projected_s": total, "budget_s": budget, "train_sentences_that_fit": fits}


if __name__ == "__main__":
    main()
