"""Downstream task families on frozen embeddings, one small file each (see ``downstream.py`` for the runner).

Each family module has ``load(spec, data_root) -> data`` (texts, labels, splits), a pure metric function
and ``run(data, embed, seed) -> dict[str, float]`` where ``embed(texts, role)`` returns (N, D) float32.
``run`` also returns, under ``ITEMS_KEY``, what a paired bootstrap of the family's ``MAIN`` metric needs,
per item and in the same item order for every model; the family's ``interval(after, before, seed, resamples)``
turns two such entries into the ``mi_tune.stats.Interval`` of MAIN(after) − MAIN(before) (``ITEMS`` names
what is resampled). This file holds what they share: reading rows from a local file, a folder of class
folders, a ``pypi:`` wheel or a Hub data set, and seeded subsampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from ...errors import UserError, field_error
from ...sources import PYPI_PREFIX, resolve_path

HUB_KEYS = ("hub", "config", "split", "revision")
ITEMS_KEY = "items"  # run()'s per-item entry for the paired bootstrap (numpy arrays; never written to results.json)

Source = Union[str, dict, None]  # a path under data_root, pypi:REQ/path, or {hub: NAME, config: ..., split: ...}


@dataclass
class TaskSpec:
    """One task of a suite. Which fields apply depends on the family (checked by ``check_spec``)."""

    family: Literal["classification", "sts", "retrieval", "clustering"]  # required: which task family (see FAMILY_FIELDS)
    data: Source = None  # sts / clustering: the rows; retrieval: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or {hub: NAME}
    train: Source = None  # classification: the data set's own train split
    test: Source = None  # classification: the data set's own test split
    split: Optional[str] = None  # retrieval: which qrels to score (default test)
    text_field: Optional[str] = None  # default: text (sts: sentence1)
    text_pair_field: Optional[str] = None  # sts: default sentence2
    label_field: Optional[str] = None  # default: label (sts: score)
    max_train: Optional[int] = None  # classification: seeded, stratified cap on train rows (null = all)
    max_test: Optional[int] = None  # classification: same for test rows
    max_samples: Optional[int] = None  # sts pairs / clustering rows (null = all)
    max_queries: Optional[int] = None  # retrieval: seeded cap on queries that have judgements
    max_corpus: Optional[int] = None  # retrieval: keep every document judged for the kept queries + seeded others up to this
    max_length: Optional[int] = None  # tokens; overrides the suite's max_length for this task


FAMILY_FIELDS = {
    "classification": {"train", "test"},
    "sts": {"data"},
    "retrieval": {"data"},
    "clustering": {"data"},
}
FAMILY_ONLY = {"train": "classification", "test": "classification", "max_train": "classification", "max_test": "classification",
               "split": "retrieval", "max_queries": "retrieval", "max_corpus": "retrieval", "text_pair_field": "sts"}


def check_spec(name: str, spec: TaskSpec, errors: list[str]) -> None:
    """Family-specific checks, appended to ``errors`` (all problems are reported at once)."""
    for f in sorted(FAMILY_FIELDS[spec.family]):
        if getattr(spec, f) is None:
            errors.append(field_error(f"tasks.{name}.{f}", None, f"a data source for a {spec.family} task",
                                      f"set tasks.{name}.{f} (a path under data_root, pypi:REQ/path, or {{hub: NAME, split: SPLIT}})"))
    for f, family in FAMILY_ONLY.items():
        if getattr(spec, f) is not None and spec.family != family:
            errors.append(field_error(f"tasks.{name}.{f}", getattr(spec, f), f"only for {family} tasks", f"remove it from this {spec.family} task"))
    for f in ("max_train", "max_test", "max_samples", "max_queries", "max_corpus"):
        v = getattr(spec, f)
        if v is not None and v < 2:
            errors.append(field_error(f"tasks.{name}.{f}", v, "null or an integer >= 2", "use null for no cap"))
    if spec.max_length is not None and spec.max_length < 2:
        errors.append(field_error(f"tasks.{name}.max_length", spec.max_length, "null or an integer >= 2", "use e.g. 128"))


def describe(source) -> str:
    if isinstance(source, dict):
        return "hub:" + str(source.get("hub")) + (f"/{source['config']}" if source.get("config") else "") + f"[{source.get('split')}]"
    return str(source)


def local_path(source: str, data_root: str | Path | None, what: str) -> Path:
    """A ``pypi:`` spec, an absolute path, or a path relative to the suite's data root."""
    if source.startswith(PYPI_PREFIX):
        return resolve_path(source, what)
    p = Path(source).expanduser()
    if not p.is_absolute() and data_root is not None:
        p = Path(data_root) / p
    if not p.exists():
        raise UserError(field_error(what, str(p), "an existing file or folder under the data root (or pypi:REQ/path, or {hub: NAME, split: ...})",
                                    "check the path, or pass --data-root pointing at the folder that holds the data sets (default ../shared/data)"))
    return p


def read_hub(source: dict, what: str) -> list[dict]:
    """Rows of a Hub data set split, through ``datasets.load_dataset`` (needs network and the datasets cache)."""
    unknown = sorted(set(source) - set(HUB_KEYS))
    if unknown or not source.get("hub") or not source.get("split"):
        raise UserError(field_error(what, source, "{hub: NAME, split: SPLIT} with optional config and revision",
                                    "write e.g. {hub: fancyzhx/ag_news, split: test}"))
    import datasets

    try:
        ds = datasets.load_dataset(source["hub"], source.get("config"), split=source["split"], revision=source.get("revision"))
    except Exception as exc:  # datasets raises many types (network, missing config, missing split)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: could not load {describe(source)} from the Hub ({first}). Allowed: a reachable data set, config and "
                        f"split. Fix: check the names, your network (HF_HUB_OFFLINE), or use a local copy with a data_root.") from None
    return [dict(r) for r in ds]


def read_file(path: Path, what: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix in (".csv", ".tsv"):
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        import datasets

        return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(path), split="train")]
    raise UserError(field_error(what, str(path), "a .jsonl, .csv, .tsv or .parquet file, or a folder of class folders", "convert the file"))


def read_class_folders(path: Path, what: str) -> list[dict]:
    """``path/<label>/*.txt`` -> rows {"text", "label"} (the BBC News layout). Non-UTF-8 files are read as cp1252."""
    rows = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", errors="replace")  # one BBC file is not UTF-8; keep it rather than drop a labeled row
            rows.append({"text": " ".join(text.split()), "label": folder.name})
    if not rows:
        raise UserError(field_error(what, str(path), "a folder holding one sub-folder of .txt files per class", "check the path"))
    return rows


def read_rows(source, data_root, what: str) -> list[dict]:
    if isinstance(source, dict):
        return read_hub(source, what)
    path = local_path(source, data_root, what)
    return read_class_folders(path, what) if path.is_dir() else read_file(path, what)


def column(rows: list[dict], field: str, what: str, source) -> list:
    if rows and field not in rows[0]:
        raise UserError(field_error(what, field, f"a column of {describe(source)}: {', '.join(map(str, rows[0]))}",
                                    "set the task's field name to one of these"))
    return [r[field] for r in rows]


def subsample(n: int, k: int | None, seed: int, labels=None) -> np.ndarray:
    """Sorted indices of a seeded sample of k out of n (all when k is None or >= n).

    With labels, the sample is stratified: each class keeps its share (largest remainders), so a
    class-balanced file stays balanced.
    """
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, size=k, replace=False))
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * k / n
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take))[: k - take.sum()]:
        take[i] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def encode_labels(*label_lists) -> tuple[list[np.ndarray], list]:
    """Map labels (ints or strings) of several splits to 0..C-1 with one shared vocabulary."""
    vocab = sorted({str(x) for labels in label_lists for x in labels}, key=lambda s: (len(s), s))
    index = {v: i for i, v in enumerate(vocab)}
    return [np.array([index[str(x)] for x in labels], dtype=np.int64) for labels in label_lists], vocab
