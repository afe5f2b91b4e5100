"""Why did IMDB fall to chance after enhancement? A learning curve of the downstream IMDB probe.

    python experiments/imdb_drop.py --adapter adapters/smollm2-135m-cpu --control adapters/smollm2-135m-cpu-lm-control

The downstream suite scores IMDB with 100 labelled reviews (first 64 tokens each) and 100 test reviews. This script
asks whether the enhanced embedding lost the sentiment, or whether 100 labels are too few to find it among what the
embedding now carries (the bag of the review's tokens: which film, which actors, the plot). For each number of
labelled reviews it fits the suite's classifier (standardised features + logistic regression, mi_tune.eval.tasks.
classification.predict) on base, adapter and control embeddings (the head's layer and pooling, as in the suite) and on
a plain bag of the same first 64 token ids (the representation the objective pushes towards), and scores 1,000 test
reviews. Differences carry paired bootstrap 95% intervals over the test reviews. Embeddings are cached like the
downstream runner's. Writes outputs/imdb-drop/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def bag_of_ids(seqs: list[list[int]], vocab: int):
    """Binary bag of token ids per review (sparse CSR)."""
    from scipy.sparse import csr_matrix

    rows = [i for i, s in enumerate(seqs) for _ in set(s)]
    cols = [t for s in seqs for t in sorted(set(s))]
    return csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(seqs), vocab))


def main() -> None:
    from mi_tune.embedding import embed_texts, tokenize
    from mi_tune.eval.downstream import head_layer_pooling
    from mi_tune.eval.cache import adapter_identity, cached_array, embedding_key
    from mi_tune.eval.tasks import read_rows, subsample
    from mi_tune.eval.tasks.classification import predict
    from mi_tune.loading import adapter_recipe, load_ready, model_config_for, resolve_adapter
    from mi_tune.stats import paired_mean_difference
    from sklearn.linear_model import LogisticRegression

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True)
    p.add_argument("--control", default=None)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--train-sizes", default="100,400,1600")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/imdb-drop")
    a = p.parse_args()
    sizes = sorted(int(x) for x in a.train_sizes.split(","))
    root = Path(a.data_root)
    train_rows, test_rows = read_rows("imdb/train_sample.jsonl", root, "train"), read_rows("imdb/test_sample.jsonl", root, "test")
    # one seeded order of a stratified training pool, classes interleaved: the first n of it for every n (nested and
    # balanced samples)
    pool = subsample(len(train_rows), sizes[-1], a.seed, [r["label"] for r in train_rows])
    pool = np.random.default_rng(a.seed).permutation(pool)
    by_class = [[i for i in pool if train_rows[i]["label"] == c] for c in sorted({train_rows[i]["label"] for i in pool})]
    pool = [i for group in zip(*by_class) for i in group]
    train_texts, train_y = [train_rows[i]["text"] for i in pool], np.array([train_rows[i]["label"] for i in pool])
    keep = subsample(len(test_rows), a.test, a.seed, [r["label"] for r in test_rows])
    test_texts, test_y = [test_rows[i]["text"] for i in keep], np.array([test_rows[i]["label"] for i in keep])
    # the downstream suite's own IMDB split (eval/downstream-cpu.yaml: 100 / 100), as a reference row
    s_train = subsample(len(train_rows), 100, a.seed, [r["label"] for r in train_rows])
    s_test = subsample(len(test_rows), 100, a.seed, [r["label"] for r in test_rows])
    splits = {"train": train_texts, "test": test_texts, "suite_train": [train_rows[i]["text"] for i in s_train],
              "suite_test": [test_rows[i]["text"] for i in s_test]}
    suite_y = {"train": np.array([train_rows[i]["label"] for i in s_train]), "test": np.array([test_rows[i]["label"] for i in s_test])}

    folder = resolve_adapter(a.adapter)
    model_cfg = model_config_for(None, adapter_recipe(folder), folder)
    columns = {"base": None, "adapter": a.adapter, **({"control": a.control} if a.control else {})}
    layer, pooling = head_layer_pooling(a.adapter)  # the enhanced adapter's head: the same for every column, as in the suite
    emb, tokenizer = {}, None
    for label, adapter in columns.items():
        ready = load_ready(model_cfg, adapter)
        tokenizer = ready.tokenizer
        for split, texts in splits.items():
            key = embedding_key("downstream-embeddings", ready.loaded.location, texts, adapter=adapter_identity(adapter),
                                dtype=str(ready.loaded.dtype), layer=layer, pooling=pooling, max_length=a.max_length)
            emb[label, split], _ = cached_array(key, lambda t=texts, r=ready, s=split, lb=label: embed_texts(
                r.model, r.tokenizer, t, layer, pooling, a.max_length, progress=f"{lb} {s}"))
        del ready

    seqs = {s: tokenize(tokenizer, t, a.max_length) for s, t in (("train", train_texts), ("test", test_texts))}
    bags = {s: bag_of_ids(v, len(tokenizer)) for s, v in seqs.items()}
    results = {"layer": layer, "pooling": pooling, "test_reviews": len(test_texts), "max_length": a.max_length,
               "by_train_size": {}}
    print(f"IMDB, first {a.max_length} tokens, {len(test_texts)} test reviews; layer {layer}, {pooling} pooling; "
          f"[..] = paired bootstrap 95% interval over test reviews")
    suite_correct = {label: (predict(emb[label, "suite_train"], suite_y["train"], emb[label, "suite_test"], a.seed) == suite_y["test"])
                     .astype(float) for label in columns}
    results["suite_split_100_100"] = {k: float(v.mean()) for k, v in suite_correct.items()}
    print("the suite's own split (100 / 100): " + ", ".join(f"{k} {v:.3f}" for k, v in results["suite_split_100_100"].items()))
    for n in sizes:
        correct = {}
        for label in columns:
            pred = predict(emb[label, "train"][:n], train_y[:n], emb[label, "test"], a.seed)
            correct[label] = (pred == test_y).astype(float)
        bow = LogisticRegression(max_iter=2000, C=1.0, random_state=a.seed).fit(bags["train"][:n], train_y[:n])
        correct["bag of the 64 token ids"] = (bow.predict(bags["test"]) == test_y).astype(float)
        row = {k: float(v.mean()) for k, v in correct.items()}
        row["adapter - base"] = paired_mean_difference(correct["adapter"], correct["base"], seed=a.seed).to_dict()
        if "control" in correct:
            row["adapter - control"] = paired_mean_difference(correct["adapter"], correct["control"], seed=a.seed).to_dict()
        results["by_train_size"][n] = row
        print(f"n_train={n:>5}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
              + f"; adapter - base {row['adapter - base']['estimate']:+.3f} [{row['adapter - base']['low']:+.3f}, {row['adapter - base']['high']:+.3f}]"
              + (f"; adapter - control {row['adapter - control']['estimate']:+.3f} [{row['adapter - control']['low']:+.3f}, "
                 f"{row['adapter - control']['high']:+.3f}]" if "control" in correct else ""))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
