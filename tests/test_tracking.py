"""MLflow tracking, read back through MLflow's own client: the embedded store and a real `mlflow server`
(127.0.0.1, SQLite backend, proxied artifacts) started by the tests. Runs, params, tags, metrics,
artifacts, the registered adapter (loaded back from the registry), secrets, and the faults: an
unreachable server at start, and a server killed mid-training whose metrics are synced afterwards.

The server boots in the background while the embedded-store tests run (a cold `mlflow server` takes
tens of seconds on a busy 2-core machine), so the tests are ordered: embedded first, server last; the
last test kills that server and restarts it (same port and database).
"""

import json
import sys
import time
from pathlib import Path
from subprocess import Popen
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import mi_tune
from mi_tune.config import flatten, load_recipe
from mi_tune.train import main as train_main
from mi_tune.mlflow_model import registered_model_name
from mi_tune.redaction import SECRET_KEY, redact, strip_userinfo
from mi_tune.tracking import MlflowTracker, NullTracker, main as tracking_main, reopen_run

from .conftest import ROOT, TINY, TINY_CORPUS, run_cli
from .mlflow_server import free_port, mlflow_server, mlflow_server_boot  # noqa: F401  (fixtures)

TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
ABSOLUTE = [f"model.source={TINY}", f"data.source={TINY_CORPUS}"]  # the embedded tests train from a temporary cwd
MODEL_NAME = "tiny-llama-lora-recoverability"
SECRETS = {"HF_TOKEN": "hf_TESTSECRET_hub_1234", "MLFLOW_TRACKING_PASSWORD": "pw_TESTSECRET_5678",
           "MLFLOW_TRACKING_TOKEN": "tok_TESTSECRET_9012"}
TEXTS = ["the cat sat on the mat", "stocks fell sharply on monday after the report"]

@pytest.fixture(scope="module", autouse=True)
def _boot_server(mlflow_server_boot):
    """Start the server now, without waiting: it boots while the embedded-store tests run."""


def _train(output_root: Path, *overrides: str) -> None:
    train_main([str(TINY_RECIPE), f"output_root={output_root}", *ABSOLUTE, "tracking.enabled=true", *overrides])


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_files(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_files(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _steps(client, run_id, key) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def check_round_trip(uri: str, run_id: str, run_dir: Path, max_steps: int):
    """What one training run must leave in MLflow, read back with MLflow's client. Returns the model version."""
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "mi_tune"
    # params: the whole flattened resolved recipe, plus what was resolved at load time
    params = run.data.params
    recipe = flatten(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    assert set(recipe) <= set(params)
    assert params["training.max_steps"] == str(max_steps) and params["lora.r"] == "4" and params["model.source"] == str(TINY)
    assert params["objective.pooling"] == "auto" and params["resolved.pooling"] == "last" and params["resolved.layer"] == "3"
    tags = run.data.tags
    assert tags["mi_tune.base_model"] == str(TINY) and tags["mi_tune.method"] == "lora-recoverability"
    assert tags["mi_tune.version"] == mi_tune.__version__ and tags["mi_tune.run_dir"] == str(run_dir.resolve())
    # per-step training and eval metrics
    assert _steps(client, run_id, "loss") == list(range(2, max_steps + 1, 2))  # logging_steps: 2
    assert {6, 12} <= set(_steps(client, run_id, "eval_recoverability_acc"))
    assert "train_runtime" in run.data.metrics and "grad_norm" in run.data.metrics
    # artifacts: the run folder's files and the MLflow model holding the adapter; no checkpoints, no local files
    files = _artifact_files(client, run_id)
    assert {"recipe.yaml", "metrics.json", "run_info.json", "README.md", "model/MLmodel", "model/requirements.txt",
            "model/data/adapter/adapter_config.json", "model/data/adapter/adapter_model.safetensors",
            "model/data/adapter/head/config.json", "model/data/adapter/head/model.safetensors",
            "model/data/adapter/recipe.yaml"} <= files
    assert not any(f.startswith("checkpoints") or "tracking_" in f for f in files)
    local = Path(client.download_artifacts(run_id, "model/data/adapter/adapter_model.safetensors"))
    assert local.read_bytes() == (run_dir / "adapter_model.safetensors").read_bytes()
    # the registered model version
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.name == MODEL_NAME and mv.status == "READY" and mv.source.endswith("/model")
    assert mv.tags["mi_tune.run_name"] == "tiny" and mv.tags["mi_tune.pooling"] == "last" and mv.tags["mi_tune.layer"] == "3"
    assert f"models:/{MODEL_NAME}/{mv.version}" in mv.description
    assert tags["mi_tune.registered_model"] == f"models:/{MODEL_NAME}/{mv.version}"
    return mv


def check_loads_from_registry(uri: str, mv, run_dir: Path, monkeypatch) -> None:
    """models:/NAME/VERSION loads with plain mlflow.pyfunc and gives the enhanced embeddings."""
    import mlflow
    from peft import PeftModel

    from mi_tune.embedding import embed_texts
    from mi_tune.loading import load_ready

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{mv.name}/{mv.version}")
    got = model.predict(TEXTS)
    ready = load_ready(adapter=str(run_dir))
    layer, pooling = ready.default_layer_pooling()
    want = embed_texts(ready.model, ready.tokenizer, TEXTS, layer=layer, pooling=pooling, max_length=32)
    assert got.shape == (2, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    raw = model.get_raw_model()
    assert isinstance(raw.model, PeftModel) and raw.head is not None and raw.head.config.layer == 3


# ---------------------------------------------------------------------------------------------
# no server needed


def test_null_tracker_has_every_public_call():
    public = {n for n in dir(MlflowTracker) if not n.startswith("_")} - {"open"}
    assert public <= set(dir(NullTracker))


def test_redaction_rules(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123")
    assert redact("token is hf_abcdef123 here") == "token is *** here"
    assert redact("http://me:pw@host:5000") == "http://***@host:5000"
    assert strip_userinfo("https://me:pw@host/x") == "https://host/x"
    assert all(SECRET_KEY.search(k) for k in ("training.hub_token", "hub.token", "db.password", "x.api_key", "aws.secret"))
    assert not any(SECRET_KEY.search(k) for k in ("training.include_num_input_tokens_seen", "model.tokenizer",
                                                  "training.average_tokens_across_devices", "data.max_length"))


def test_one_upload_policy_for_mlflow_and_the_hub(tmp_path, monkeypatch):
    """Checkpoints, caches at any depth, this machine's tracking records, hidden files, links and unfinished writes stay
    local for both MLflow (shareable) and the Hub (hub_files); text that leaves is redacted."""
    from mi_tune.run_files import hub_files, shareable

    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123")
    run = tmp_path / "run"
    for rel in ("metrics.json", "downstream/s/results.json", "checkpoints/checkpoint-2/adapter_model.safetensors",
                "downstream/s/cache/emb.safetensors", "downstream/s/__pycache__/m.json", "tracking_run.json",
                "tracking_unsent.jsonl", ".hidden.json", "run_info.json.tmp"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("{}")
    (run / "recipe.yaml").write_text("training:\n  hub_token: hf_abcdef123\n")
    (run / "link.json").symlink_to(run / "metrics.json")
    shared = {"metrics.json", "recipe.yaml", "downstream/s/results.json"}
    assert set(hub_files(run)[0]) == shared
    with shareable(run) as copy:
        assert copy != run and {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} == shared
        assert "hf_abcdef123" not in (copy / "recipe.yaml").read_text()
    with shareable(run / "metrics.json") as same:
        assert same == run / "metrics.json"  # nothing to change: sent as it is


def test_registered_model_name_from_base_model_and_method():
    quick = load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml")
    assert registered_model_name(quick) == "SmolLM2-135M-Instruct.Q4_1-lora-recoverability"
    control = load_recipe(TINY_RECIPE, ["objective.lm_weight=1", "objective.recoverability_weight=0"])
    assert registered_model_name(control) == "tiny-llama-lora-lm-control"


def test_unreachable_server_fails_fast_before_the_model_loads(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("mi_tune.train", str(TINY_RECIPE), f"output_root={tmp_path}", "tracking.enabled=true", f"tracking.tracking_uri={dead}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"the MLflow server at {dead} is unreachable" in proc.stderr and "tracking.allow_fallback: true" in proc.stderr
    assert "loading" not in proc.stderr and not (tmp_path / "tiny" / "run_info.json").exists()  # no model was loaded


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """A tiny run whose server is unreachable, fallback allowed: it lands in the embedded store of its cwd."""
    home = tmp_path_factory.mktemp("embedded")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _train(home / "runs", f"tracking.tracking_uri={dead}", "tracking.allow_fallback=true")
    run_dir = home / "runs" / "tiny"
    info = json.loads((run_dir / "tracking_run.json").read_text())
    return SimpleNamespace(home=home, run_dir=run_dir, uri=info["tracking_uri"], run_id=info["run_id"], dead=dead)


def test_embedded_store_round_trip_and_fallback_is_recorded(embedded_run, monkeypatch):
    assert embedded_run.uri == f"sqlite:///{embedded_run.home / 'mlruns.db'}"
    assert (embedded_run.home / "mlartifacts").is_dir()  # artifacts next to the database
    mv = check_round_trip(embedded_run.uri, embedded_run.run_id, embedded_run.run_dir, max_steps=12)
    run = _client(embedded_run.uri).get_run(embedded_run.run_id)
    assert run.data.tags["mi_tune.tracking_fallback_from"] == embedded_run.dead
    held = json.loads((embedded_run.run_dir / "metrics.json").read_text())["heldout_check"]["heldout"]
    for model in ("base", "enhanced"):  # the held-out check: every number of metrics.json, as logged
        numbers = {k: v for k, v in held[model].items() if isinstance(v, (int, float))}
        assert "recoverability_acc" in numbers
        assert {k: run.data.metrics[f"heldout_{model}_{k}"] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    assert not (embedded_run.run_dir / "tracking_unsent.jsonl").exists()
    check_loads_from_registry(embedded_run.uri, mv, embedded_run.run_dir, monkeypatch)


def test_reopen_run_attaches_eval_results_to_the_training_run(embedded_run, tmp_path):
    client = _client(embedded_run.uri)
    with reopen_run(embedded_run.run_dir) as t:
        assert t.run_id == embedded_run.run_id
        t.log_layer_curve({layer: {"toy_recoverability_acc": 0.1 * layer} for layer in range(4)})
        t.log_downstream({"sts": {"spearman": 0.5}})
    run = client.get_run(embedded_run.run_id)
    assert run.info.status == "FINISHED"  # re-opening does not change the training run's status
    hist = sorted(client.get_metric_history(run.info.run_id, "probe_toy_recoverability_acc"), key=lambda m: m.step)
    assert [(m.step, round(m.value, 6)) for m in hist] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.data.metrics["downstream_sts_spearman"] == 0.5
    with reopen_run(embedded_run.run_dir, child="probe") as child:
        child.log_layer_curve({0: {"x_acc": 1.0}})
    c = client.get_run(child.run_id)
    assert c.data.tags["mlflow.parentRunId"] == embedded_run.run_id and c.info.status == "FINISHED"
    assert c.info.experiment_id == run.info.experiment_id and c.info.run_name == "probe"
    assert isinstance(reopen_run(tmp_path), NullTracker)  # trained with tracking off: nothing to attach to


def test_log_run_outputs_logs_probe_and_downstream_sections(embedded_run, tmp_path):
    """Eval results written into metrics.json before the end of a run become probe_* / downstream_* metrics."""
    import shutil

    from mi_tune.tracking import log_run_outputs

    run_dir = tmp_path / "tiny-evaluated"
    shutil.copytree(embedded_run.run_dir, run_dir, ignore=shutil.ignore_patterns("tracking_*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["probe"] = {str(layer): {"ag_news": {"recoverability_acc": 0.2 + 0.05 * layer}} for layer in range(4)}
    metrics["downstream"] = {"bbc_classification": {"accuracy": 0.8}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "probe_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run_dir / "downstream" / "s" / "cache").mkdir(parents=True)
    (run_dir / "downstream" / "s" / "results.json").write_text("{}")
    (run_dir / "downstream" / "s" / "cache" / "emb.safetensors").write_bytes(b"cached embeddings")
    tracker = MlflowTracker.open(embedded_run.uri, "mi_tune", "tiny-evaluated", {}, run_dir / "tracking_unsent.jsonl")
    log_run_outputs(tracker, run_dir, load_recipe(run_dir / "recipe.yaml"))
    tracker.end()
    client = _client(embedded_run.uri)
    run = client.get_run(tracker.run_id)
    assert _steps(client, tracker.run_id, "probe_ag_news_recoverability_acc") == [0, 1, 2, 3]
    assert run.data.metrics["probe_ag_news_recoverability_acc"] == pytest.approx(0.35)  # the latest = the last layer
    assert run.data.metrics["downstream_bbc_classification_accuracy"] == 0.8
    files = _artifact_files(client, tracker.run_id)
    assert {"probe_curve.png", "metrics.json", "downstream/s/results.json", "model/data/adapter/adapter_model.safetensors"} <= files
    assert not any("cache" in f for f in files)  # caches stay local, as on the Hub
    assert "adapter_model.safetensors" not in files and not any(f.startswith("checkpoints") for f in files)  # uploaded once
    (mv,) = client.search_model_versions(f"run_id = '{tracker.run_id}'")
    assert mv.name == MODEL_NAME and int(mv.version) >= 2 and mv.tags["mi_tune.run_name"] == "tiny-evaluated"


def test_sync_errors_are_clear(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        tracking_main(["sync", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    unsent = tmp_path / "tracking_unsent.jsonl"
    record = {"kind": "metrics", "step": 2, "timestamp": 1, "metrics": {"loss": 1.0}, "run_id": "abc",
              "uri": f"http://127.0.0.1:{free_port()}"}
    unsent.write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as e:
        tracking_main(["sync", str(unsent)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 record(s) remain" in err and "Traceback" not in err
    assert json.loads(unsent.read_text()) == record  # nothing lost


def test_sync_keeps_a_refused_record_and_sends_the_others(embedded_run, tmp_path, capsys):
    good = {"kind": "metrics", "step": 99, "timestamp": 1, "metrics": {"synced_probe_value": 1.5}, "run_id": embedded_run.run_id,
            "uri": embedded_run.uri}
    refused = {**good, "run_id": "0" * 32}  # no such run in that store
    unsent = tmp_path / "tracking_unsent.jsonl"
    unsent.write_text(json.dumps(refused) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(SystemExit) as e:
        tracking_main(["sync", str(tmp_path)])  # the run folder works as well as the file
    assert e.value.code == 2 and "sent 1 record(s); 1 record(s) remain" in capsys.readouterr().err
    assert [json.loads(line) for line in unsent.read_text().splitlines()] == [refused]
    assert _client(embedded_run.uri).get_run(embedded_run.run_id).data.metrics["synced_probe_value"] == 1.5


# ---------------------------------------------------------------------------------------------
# a real server


@pytest.fixture(scope="module")
def server_run(mlflow_server, tmp_path_factory):
    """A tiny run against the server, with secrets in the environment, in a param, and in the URI."""
    home = tmp_path_factory.mktemp("server-run")
    uri_with_password = mlflow_server.uri.replace("http://", f"http://mi:{SECRETS['MLFLOW_TRACKING_PASSWORD']}@")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRETS.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_TRACKING_USERNAME", "mi")
        _train(home / "runs", f"tracking.tracking_uri={uri_with_password}", "check.enabled=false",
               f"training.hub_token={SECRETS['HF_TOKEN']}", f"hub.repo_id=someone/{SECRETS['MLFLOW_TRACKING_TOKEN']}")
    run_dir = home / "runs" / "tiny"
    info = json.loads((run_dir / "tracking_run.json").read_text())
    return SimpleNamespace(run_dir=run_dir, uri=mlflow_server.uri, run_id=info["run_id"], info=info)


def test_server_round_trip(server_run, monkeypatch):
    assert server_run.info["tracking_uri"] == server_run.uri  # credentials are not written to the run folder
    mv = check_round_trip(server_run.uri, server_run.run_id, server_run.run_dir, max_steps=12)
    assert mv.source.startswith("mlflow-artifacts:")  # stored through the server's artifact proxy
    check_loads_from_registry(server_run.uri, mv, server_run.run_dir, monkeypatch)


def test_secrets_never_reach_params_tags_or_artifacts(server_run, mlflow_server):
    client = _client(server_run.uri)
    run = client.get_run(server_run.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["training.hub_token"] == "***"
    assert params["hub.repo_id"] == "someone/***"
    assert params["tracking.tracking_uri"] == f"http://***@127.0.0.1:{mlflow_server.port}"
    texts = [*params, *params.values(), *tags, *tags.values()]
    for name in ("recipe.yaml", "README.md", "metrics.json", "run_info.json", "model/MLmodel", "model/data/adapter/recipe.yaml"):
        texts.append(Path(client.download_artifacts(server_run.run_id, name)).read_text())
    texts.append(json.dumps(server_run.info))
    for secret in SECRETS.values():
        assert not any(secret in t for t in texts), secret
    assert "hub_token: '***'" in Path(client.download_artifacts(server_run.run_id, "recipe.yaml")).read_text()


def test_server_killed_mid_training_then_synced(mlflow_server, tmp_path, capsys):
    """Kill -9 the server after the first logged steps: training finishes, says what was not sent and how
    to sync; the server comes back (same port, same database); `sync` sends the rest; nothing is lost."""
    import os

    server = mlflow_server
    client = _client(server.uri)
    max_steps = 40
    run_dir = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "mi_tune.train", str(TINY_RECIPE), f"output_root={tmp_path / 'runs'}", "tracking.enabled=true",
           f"tracking.tracking_uri={server.uri}", f"training.max_steps={max_steps}", "training.eval_strategy='no'",
           "training.save_strategy='no'", "check.enabled=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(tmp_path / "train.log", "w") as log:
        proc = Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        run_id, seen = None, []
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(seen) < 2:
            if run_id is None and (run_dir / "tracking_run.json").exists():
                run_id = json.loads((run_dir / "tracking_run.json").read_text())["run_id"]
            if run_id is not None:
                seen = client.get_metric_history(run_id, "loss")
            time.sleep(0.1)
        assert proc.poll() is None and len(seen) >= 2, "training ended (or never logged) before the server could be killed"
        server.kill()
        server.start()  # it comes back while training carries on (or after it ended): either way nothing may be lost
        assert proc.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "train.log").read_text()
    unsent = run_dir / "tracking_unsent.jsonl"
    assert "did not reach" in out and f"python -m mi_tune.tracking sync {unsent}" in out
    kept = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert any(r["kind"] == "metrics" for r in kept) and all(r["run_id"] == run_id for r in kept)
    assert (run_dir / "adapter_model.safetensors").exists()  # training finished and saved

    server.wait()
    tracking_main(["sync", str(unsent)])  # the CLI, in-process
    assert f"sent {len(kept)} record(s)" in capsys.readouterr().out and not unsent.exists()
    assert _steps(client, run_id, "loss") == list(range(2, max_steps + 1, 2))  # every logged step: before, during, after
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_model_versions(f"run_id = '{run_id}'")) == 1
