"""What the tracker does when sending fails, and resume: only transport errors (the store unreachable or
failing: connection refused or reset, timeouts, HTTP 5xx) are kept in the unsent file; a bad request or a
bug fails the run. A run that cannot be re-opened on resume is a UserError, never a silent new run. A
training killed between creating its MLflow run and logging its params gets them on resume, in the same run.

Everything runs on temporary embedded stores (no server)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import requests
import yaml
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mi_tune import mlflow_model
from mi_tune.config import flatten
from mi_tune.errors import UserError
from mi_tune.mlflow_store import is_transport_error
from mi_tune.tracking import MlflowTracker, NullTracker, ensure_params

from .conftest import ROOT, TINY, TINY_CORPUS, kill_at_marker
from .mlflow_server import free_port

TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module (creating one runs MLflow's migrations: seconds)."""
    root = tmp_path_factory.mktemp("store")
    return f"sqlite:///{root / 'mlruns.db'}"


def _wrapped(inner: Exception) -> MlflowException:
    """How MLflow 3 reports a failed HTTP request: raised while handling the requests error (mlflow.utils.rest_utils)."""
    try:
        raise inner
    except Exception as e:
        try:
            raise MlflowException(f"API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception {e}")
        except MlflowException as wrapper:
            return wrapper


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize("exc, transport", [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (TimeoutError("timed out"), True),
    (_wrapped(requests.ConnectionError("Max retries exceeded: Connection refused")), True),
    (_wrapped(requests.exceptions.RetryError("too many 503 error responses")), True),
    (_wrapped(requests.ReadTimeout("read timed out")), True),
    (RestException({"error_code": "INTERNAL_ERROR", "message": "the server failed"}), True),
    (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}), True),
    (_http_error(502), True),  # artifact upload through the server's proxy
    (_wrapped(TypeError("Object of type Path is not JSON serializable")), False),  # our bug, seen through MLflow's wrapper
    (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "param changed"}), False),
    (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"}), False),
    (RestException({"error_code": "PERMISSION_DENIED", "message": "no"}), False),
    (MlflowException("bad batch", error_code=INVALID_PARAMETER_VALUE), False),
    (_http_error(400), False),
    (TypeError("unsupported operand"), False),
    (KeyError("step"), False),
    (FileNotFoundError(2, "No such file", "adapter_config.json"), False),
], ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x))
def test_transport_errors_are_told_from_the_rest(exc, transport):
    assert is_transport_error(exc) is transport


def test_unreachable_server_is_queued_with_what_mlflow_really_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    t = MlflowTracker(dead, "0" * 32, tmp_path / "tracking_unsent.jsonl")
    t.log_metrics({"loss": 1.5}, step=2)
    t.log_params({"lora.r": 4})  # the server is now known to be down: straight to the file
    kept = [json.loads(line) for line in (tmp_path / "tracking_unsent.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in kept] == ["metrics", "params"] and t.unsent == 2
    assert kept[0]["metrics"] == {"loss": 1.5} and kept[0]["run_id"] == "0" * 32 and kept[0]["uri"] == dead


def test_programming_error_in_submission_is_raised_not_queued(store, tmp_path, monkeypatch):
    t = MlflowTracker.open(store, "errors", "bug", {}, tmp_path / "tracking_unsent.jsonl")

    def broken(*args, **kwargs):
        raise TypeError("build_mlflow_model() got an unexpected keyword argument")

    monkeypatch.setattr(mlflow_model, "build_mlflow_model", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        t.register_adapter(tmp_path, "some-model")
    t.log_params({"lora.r": 4})
    with pytest.raises(MlflowException) as e:  # a bad request: a param may not change its value
        t.log_params({"lora.r": 8})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert not (tmp_path / "tracking_unsent.jsonl").exists() and t.unsent == 0
    assert _client(store).get_run(t.run_id).data.params == {"lora.r": "4"}


def test_resume_of_a_run_the_store_lacks_is_a_user_error_not_a_new_run(store, tmp_path):
    client = _client(store)
    MlflowTracker.open(store, "resume-errors", "first", {}, tmp_path / "tracking_unsent.jsonl").end()
    exp = client.get_experiment_by_name("resume-errors")
    missing = "0123456789abcdef" * 2
    with pytest.raises(UserError) as e:
        MlflowTracker.open(store, "resume-errors", "tiny", {}, tmp_path / "tracking_unsent.jsonl", run_id=missing)
    msg = str(e.value)
    assert missing in msg and store in msg and str(tmp_path / "tracking_run.json") in msg
    assert "tracking.enabled=false" in msg and "delete" in msg
    assert len(client.search_runs([exp.experiment_id])) == 1  # no run was started


def test_ensure_params_logs_what_a_reopened_run_lacks(store, tmp_path):
    first = MlflowTracker.open(store, "ensure", "tiny", {}, tmp_path / "u.jsonl")
    ensure_params(first, {"lora.r": 4, "tracking.experiment": "ensure"})  # a new run: all of them
    again = MlflowTracker.open(store, "ensure", "tiny", {}, tmp_path / "u.jsonl", run_id=first.run_id)
    # on resume a tracking.* value may differ (MLflow would refuse to change it): only the missing key is logged
    ensure_params(again, {"lora.r": 4, "tracking.experiment": "other", "resolved.layer": 3})
    assert _client(store).get_run(first.run_id).data.params == {"lora.r": "4", "tracking.experiment": "ensure", "resolved.layer": "3"}
    ensure_params(NullTracker(), {"lora.r": 4})  # tracking off: nothing to do


def test_kill_between_run_creation_and_params_then_resume_logs_them_to_the_same_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_dir = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "mi_tune.train", str(TINY_RECIPE), f"output_root={tmp_path / 'runs'}", f"model.source={TINY}",
           f"data.source={TINY_CORPUS}", "tracking.enabled=true", f"tracking.tracking_uri={uri}", "training.max_steps=2",
           "training.eval_strategy='no'", "training.save_strategy='no'", "check.enabled=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MI_TUNE_TEST_"))}
    markers = tmp_path / "markers"
    proc = kill_at_marker(cmd, tmp_path, {**env, "MI_TUNE_TEST_MARKERS": str(markers)}, markers, "tracking-run-created",
                          tmp_path / "first.log", "creating its MLflow run")
    assert proc.returncode == -signal.SIGKILL
    run_id = json.loads((run_dir / "tracking_run.json").read_text())["run_id"]
    client = _client(uri)
    cut = client.get_run(run_id)
    assert cut.data.params == {} and cut.info.status == "RUNNING"  # killed after the run was created, before its params

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "re-opened to resume" in again.stderr and "logging them now" in again.stderr
    assert json.loads((run_dir / "tracking_run.json").read_text())["run_id"] == run_id  # the same MLflow run
    run = client.get_run(run_id)
    recipe = flatten(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    assert set(recipe) <= set(run.data.params)
    assert run.data.params["training.max_steps"] == "2" and run.data.params["lora.r"] == "4"
    assert run.data.params["resolved.pooling"] == "last" and run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]  # no second run
