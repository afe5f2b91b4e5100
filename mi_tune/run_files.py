"""Which files of a run folder leave this machine, for MLflow artifacts (``tracking.py``) and the Hub (``hub.py``).

One policy for both: checkpoints, caches, the tracking records of this machine, hidden files, symbolic links
and unfinished writes (``*.tmp``) stay local (``local_reason``), at any depth. The Hub in addition takes only
formats that are safe to publish (``PUSH_SUFFIXES``: no pickle weights) and gets a generated model card in
place of README.md (``hub_files``). Text that leaves is redacted first (``redaction.py``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .redaction import redact_text
from .runs import CHECKPOINTS_DIR, README_FILE, TRACKING_FILE, UNSENT_FILE

# Local-only content, with the reason printed by ``python -m mi_tune.push --dry-run``.
LOCAL_ONLY_DIRS = {CHECKPOINTS_DIR: "training checkpoints stay local", "cache": "caches stay local",
                   "__pycache__": "caches stay local"}
LOCAL_ONLY_FILES = {TRACKING_FILE: "points at the local MLflow run", UNSENT_FILE: "local MLflow backlog"}
# Safetensors, JSON, YAML, Markdown, CSV and figures only: pickle weights (.bin/.pt) are never pushed to the Hub.
PUSH_SUFFIXES = {".json", ".safetensors", ".yaml", ".md", ".csv", ".png", ".svg"}
# Checked for secrets (and redacted) before they leave.
TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".md", ".txt", ".csv", ".cfg", ".toml", ".svg"}


def local_reason(item: Path) -> str | None:
    """Why a run folder entry stays on this machine, or None when it may leave."""
    if item.is_symlink():
        return "symbolic link"
    if item.name.startswith("."):
        return "hidden"
    if item.is_dir():
        return LOCAL_ONLY_DIRS.get(item.name)
    if item.name in LOCAL_ONLY_FILES:
        return LOCAL_ONLY_FILES[item.name]
    if item.name.endswith(".tmp"):
        return "unfinished write"
    return None


def walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, Path, str | None]]:
    """Every file of ``folder`` as (path in the upload, local path, why it stays local or None), sorted.
    A local-only folder is given once, with a trailing ``/``, and not entered."""
    for item in sorted(folder.iterdir()):
        rel = prefix + item.relative_to(folder).as_posix()
        why = local_reason(item)
        if item.is_dir() and not item.is_symlink() and why is None:
            yield from walk(item, rel + "/")
        else:
            yield rel + ("/" if item.is_dir() and not item.is_symlink() else ""), item, why


def hub_files(folder: Path, prefix: str = "") -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Files of a folder that go to the Hub (keyed by path in the repo), and what stays local with the reason.
    README.md at the top is left out: the generated model card takes its place. Sorted, deterministic."""
    files: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    for rel, item, why in walk(folder, prefix):
        if why is not None:
            skipped.append((rel, why))
        elif rel == README_FILE:
            continue
        elif item.suffix.lower() not in PUSH_SUFFIXES:
            skipped.append((rel, f"{item.suffix or 'no suffix'} is not shared (shared: {', '.join(sorted(PUSH_SUFFIXES))})"))
        else:
            files[rel] = item
    return files, skipped


def redacted(path: Path, *also: str | None) -> str | None:
    """The text of ``path`` with its secrets (and ``also``) redacted, or None when it is no text file
    (``TEXT_SUFFIXES``) or holds no secret: then it leaves as it is."""
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return None
    text = path.read_text(errors="replace")
    clean = redact_text(text, *also)
    return clean if clean != text else None


@contextmanager
def shareable(path: Path):
    """Yield ``path``, or a copy of it without its local-only entries and with secrets redacted from its text files
    (a copy only when something has to change). For MLflow artifacts: a file or a whole folder."""
    path = Path(path)
    files = [(path, None)] if path.is_file() else [(p, why) for _, p, why in walk(path)]
    if not any(why is not None or redacted(p) is not None for p, why in files):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mi_tune_shared_") as tmp:
        copy = Path(tmp) / path.name
        if path.is_file():
            shutil.copy2(path, copy)
        else:
            shutil.copytree(path, copy, ignore=lambda d, names: [n for n in names if local_reason(Path(d) / n)])
        for p in [copy] if copy.is_file() else [q for q in copy.rglob("*") if q.is_file()]:
            if (clean := redacted(p)) is not None:
                p.write_text(clean)
        yield copy
