"""On-disk cache of embeddings/features, keyed by everything that determines them.

``embedding_key`` is the one key of every cached embedding (the probe's features, the downstream runner's
embeddings, training's base features). Key parts: model source (+revision, + size and modification time of each
weight file of a local model), adapter (path + content hash of adapter_model.safetensors, or Hub id + revision),
the exact texts (content hash), and the caller's settings (layers, pooling, max length, dtype...).
Files are .npy under ``$MI_TUNE_CACHE/features`` written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..sources import cache_dir


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_hash(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def adapter_identity(adapter: str | None) -> dict | None:
    if adapter is None:
        return None
    p = Path(adapter)
    if p.exists():
        return {"path": str(p.resolve()), "sha": file_hash(p / "adapter_model.safetensors")}
    return {"hub": adapter}


def model_identity(location) -> dict:
    """What names a model's weights: the source and revision, plus size and mtime (ns) of each weight file of a
    local folder (so that a folder rewritten in place does not serve stale features)."""
    out = {"model": location.spec, "revision": location.revision}
    if location.is_local:
        p = Path(location.path)
        files = [p / location.gguf_file] if location.gguf_file else sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
        out["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return out


def embedding_key(kind: str, location, texts: Sequence[str], **parts) -> dict:
    """Cache key parts of pooled embeddings of ``texts`` by the model at ``location`` (plus layer, pooling,
    max length, dtype, adapter... in ``parts``): what the probe, the downstream runner and training's base features share."""
    return {"kind": kind, **model_identity(location), "texts": texts_hash(texts), "n": len(texts), **parts}


def cache_key(**parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_array(key_parts: dict, compute: Callable[[], np.ndarray], enabled: bool = True, folder: Path | None = None) -> tuple[np.ndarray, bool]:
    """Return (array, hit). Computes and stores on a miss."""
    if not enabled:
        return compute(), False
    path = _path(key_parts, folder)
    if path.exists():
        return np.load(path, allow_pickle=False), True
    arr = compute()
    store_array(key_parts, arr, folder)
    return arr, False


def _path(key_parts: dict, folder: Path | None) -> Path:
    root = folder or (cache_dir() / "features")
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{cache_key(**key_parts)}.npy"


def store_array(key_parts: dict, arr: np.ndarray, folder: Path | None = None) -> Path:
    """Write ``arr`` under its key atomically (temp file + rename), with the key beside it as JSON."""
    path = _path(key_parts, folder)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)
    (path.parent / f"{path.stem}.json").write_text(json.dumps(key_parts, sort_keys=True, default=str, indent=1))
    return path
