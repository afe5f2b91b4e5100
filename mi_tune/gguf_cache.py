"""A local GGUF model converted once into a cached standard Hugging Face folder, so that later loads skip the GGUF parser.

Parsing a GGUF header and vocabulary with the ``gguf`` package takes tens of seconds on a small CPU, and transformers
parses it once for the config, once more for the weights and twice for the tokenizer. ``hf_folder`` writes
``$MI_TUNE_CACHE/gguf-hf/<file stem>-<key>/`` once: ``config.json`` and the tokenizer files first (all a dry run
needs), then ``model.safetensors`` when the weights are first loaded: float32, exactly the tensors transformers
dequantizes from the GGUF (so any dtype cast at load time rounds the same numbers as before). Both steps are atomic
(a temp folder renamed into place, a temp file replaced into place): a killed conversion leaves nothing that is used.

The key is the file's identity without reading its bytes: resolved path, size and modification time, plus the
versions of transformers and gguf that convert it (a new version may dequantize differently). The model's recorded
identity stays the GGUF (``sources.ModelLocation``): feature-cache keys, cards, head configs and adapter configs never
name this folder. ``MI_TUNE_GGUF_CACHE=0`` loads GGUF files directly, as before (no disk copy; every load parses).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

from .errors import log
from .sources import ModelLocation, cache_dir

FORMAT = 1  # bump when what is written here changes: old folders are then ignored
WEIGHTS = "model.safetensors"  # written last: its presence means the folder is complete
GENERATION = "generation_config.json"
IDENTITY = "gguf_source.json"  # the GGUF file this folder was converted from, for people reading the cache


def enabled() -> bool:
    return os.environ.get("MI_TUNE_GGUF_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("transformers", "gguf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def folder_for(gguf: Path) -> tuple[Path, dict]:
    """The cache folder of a GGUF file and the identity it is keyed by (a stat, not a hash of the bytes)."""
    real = gguf.resolve()
    st = real.stat()
    identity = {"file": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": FORMAT, **_versions()}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "gguf-hf" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', real.stem)}-{key}", identity


def _kept_packed(gguf: Path) -> bool:
    """Whether transformers loads this architecture with its own fast reader and may keep the weights in GGUF blocks
    (GgufLinear): those load directly, since a float32 copy would change their memory use and kernels."""
    try:
        from transformers.integrations.gguf import GGUF_ARCHS, read_gguf_metadata
    except ImportError:  # a transformers without that path dequantizes every architecture
        return False
    try:
        return read_gguf_metadata(str(gguf))[0].get("general.architecture") in GGUF_ARCHS
    except Exception:  # not a readable GGUF: the conversion's own loading reports it, as a direct load would
        return False


def hf_folder(loc: ModelLocation, weights: bool = False) -> Path | None:
    """The converted folder of a local GGUF model: config and tokenizer, plus the weights when ``weights``; each part
    converted on first use. None when ``loc`` loads as it is: not a GGUF, a GGUF on the Hub, an architecture that
    transformers keeps packed, ``MI_TUNE_GGUF_CACHE=0``, or a cache that cannot be written (read-only, disk full)."""
    if not (loc.gguf_file and loc.is_local and enabled()):
        return None
    folder, identity = folder_for(Path(loc.path) / loc.gguf_file)
    try:
        if not folder.is_dir():
            if _kept_packed(Path(loc.path) / loc.gguf_file):
                return None
            _convert_header(loc, folder, identity)
        if weights and not (folder / WEIGHTS).is_file():
            _convert_weights(loc, folder)
    except OSError as exc:  # the direct load that follows reports a GGUF that cannot be read, as it always did
        log(f"{loc.spec}: could not convert the GGUF into {folder} ({type(exc).__name__}: {exc}); reading the GGUF directly")
        return None
    return folder


def _partial_prefix(path: Path) -> str:
    """Temp names of this machine's conversions of ``path`` (a cache on a shared disk may see other machines')."""
    return f"{path.name}.partial-{socket.gethostname()}-"


def _partial(path: Path) -> Path:
    return path.with_name(f"{_partial_prefix(path)}{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clear_stale(path: Path) -> None:
    """Remove what killed conversions of ``path`` on this machine left: temp names whose process is gone."""
    for leftover in path.parent.glob(f"{glob.escape(_partial_prefix(path))}*"):
        pid = leftover.name.rpartition("-")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _convert_header(loc: ModelLocation, folder: Path, identity: dict) -> None:
    """config.json + tokenizer files, as transformers reads them from the GGUF, into ``folder`` (atomically)."""
    from transformers import AutoConfig, AutoTokenizer

    log(f"{loc.spec}: converting the GGUF once into {folder} (config and tokenizer now, float32 weights on the first "
        f"model load); later loads read that folder (MI_TUNE_GGUF_CACHE=0 turns this off)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(folder)
    tmp = _partial(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        AutoConfig.from_pretrained(loc.path, gguf_file=loc.gguf_file).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(loc.path, gguf_file=loc.gguf_file).save_pretrained(tmp)  # before mi_tune's pad setup
        (tmp / IDENTITY).write_text(json.dumps(identity, indent=1) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # another process finished the same conversion first: its folder holds the same files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_weights(loc: ModelLocation, folder: Path) -> None:
    """``model.safetensors``: the float32 tensors transformers dequantizes from the GGUF, tied copies stored once."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(folder)  # the header's config, converted above: saves parsing the GGUF for it again
    # The causal-LM class keeps the LM head too; AutoModel loads the same file (transformers drops the prefix).
    cls = AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
    log(f"{loc.spec}: de-quantizing the GGUF weights once into {folder / WEIGHTS} (float32)")
    model = cls.from_pretrained(loc.path, gguf_file=loc.gguf_file, config=config, dtype=torch.float32)
    if getattr(model, "generation_config", None) is not None:  # as the GGUF load builds it (from a folder, it would be rebuilt from config.json)
        _write_atomically(folder / GENERATION, lambda tmp, m=model: m.generation_config.to_json_file(tmp, use_diff=True))
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:  # a tied copy (lm_head = embed_tokens) is tied again by the config at load time
            seen.add(ident)
            tensors[name] = tensor.contiguous()
    del model
    _write_atomically(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))  # the last step


def _write_atomically(target: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``target``: readers see the whole file or none."""
    _clear_stale(target)
    tmp = _partial(target)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates files owner-only; a cache may be shared, like the other files here
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
