"""MLflow tracking with the same calls whether tracking is on or off (``NullTracker``).

Where runs go: the embedded store by default (``sqlite:///<cwd>/mlruns.db``, artifacts in
``<cwd>/mlartifacts``), or a server named by the recipe's ``tracking.tracking_uri`` or
``$MLFLOW_TRACKING_URI``; MLflow's own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` /
``MLFLOW_TRACKING_TOKEN`` apply. Secrets never reach params, tags or text artifacts (``redaction.py``).

One run per training (``train.py``): params = the flattened resolved recipe (long values whole in
the ``recipe.yaml`` artifact), tags, per-step metrics, and these artifacts::

    recipe.yaml, metrics.json, run_info.json, README.md   the run folder's files (+ eval JSON, plots)
    model/                                                 an MLflow pyfunc model, registered as a
      MLmodel, requirements.txt, ...                       model version; its data is the adapter:
      data/adapter/                                        PEFT files + head/ + recipe.yaml

A resumed training re-opens its run (named in ``tracking_run.json``) and logs the params the run
lacks (``ensure_params``).

Evaluations attach to the training run (or to a child of it) with ``reopen_run(run_dir)``. Layer
curves are metrics ``probe_*`` logged with step = layer (``log_layer_curve``); downstream results are
metrics ``downstream_*`` (``log_downstream``). ``python -m mi_tune.compare`` reads those names.

Faults: an unreachable server at start is a UserError before any model loads, unless
``tracking.allow_fallback: true`` (then the local store is used and the run is tagged
``mi_tune.tracking_fallback_from``). A run that cannot be re-opened on resume is a UserError, never a
silent new run. If the server goes away mid-run, every call that could not be sent for that reason
(``is_transport_error``: connection refused or reset, timeout, HTTP 5xx) is appended to
``<run_dir>/tracking_unsent.jsonl``, training carries on, and the end of the run prints how to replay
them: ``python -m mi_tune.tracking sync <run_dir>/tracking_unsent.jsonl``. Any other failure (a 4xx
bad request, a bug) is raised and fails the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from .config import TrackingSettings
from .errors import UserError, log
from .redaction import SECRET_KEY, redact, redact_text, strip_userinfo

TRACKING_FILE, UNSENT_FILE = "tracking_run.json", "tracking_unsent.jsonl"
MODEL_ARTIFACT = "model"  # artifact folder of the MLflow model (the registered model version's source)
MODEL_DATA = "adapter"  # inside it: data/adapter/, a plain PEFT adapter folder (+ head/, recipe.yaml)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "head", "recipe.yaml", "run_info.json", "README.md")
ADAPTER_ONLY = {"adapter_config.json", "adapter_model.safetensors", "head"}  # uploaded once, inside model/
LOCAL_ONLY = {"checkpoints", TRACKING_FILE, UNSENT_FILE}  # bulk, or machine-specific: never uploaded
TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".md", ".txt", ".csv", ".cfg", ".toml"}  # checked for secrets before upload (_secret_free)

# MLflow's HTTP client retries a dead server for ~4 minutes per call by default. Our tracker keeps
# what it cannot send, so long retries would only stall training; these apply unless already set.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
OFFLINE_RETRY_S = 30.0  # once a server failed, ask /health at most this often before sending again


# ---------------------------------------------------------------------------------------------
# where, and what may be written there


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def resolve_uri(settings: TrackingSettings) -> str:
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def is_http(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def registered_model_name(recipe) -> str:
    """``<base model name>-<method>``, e.g. ``SmolLM2-135M-Instruct.Q4_1-lora-recoverability``.

    Runs of the same base model and method are versions of one registered model; each version is
    tagged with its run name. A ``tracking.registered_model`` recipe field, when the recipe has one, wins.
    """
    explicit = getattr(recipe.tracking, "registered_model", None)
    if explicit:
        return explicit
    source = recipe.model.gguf_file or recipe.model.source
    stem = re.sub(r"\.gguf$", "", source.rstrip("/").split("/")[-1], flags=re.I)
    method = "lora-recoverability" if recipe.objective.recoverability_weight > 0 else "lora-lm-control"  # as train.py tags it
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}-{method}").strip("-")


def check_reachable(uri: str) -> None:
    """Raise UserError if an http(s) tracking server does not answer."""
    if not is_http(uri):
        return
    ok, reason = _health(uri, timeout=5)
    if not ok:
        raise UserError(
            f"tracking.tracking_uri: the MLflow server at {strip_userinfo(uri)} is unreachable ({reason}). Allowed: a running "
            f"tracking server, or the local store. Fix: start the server, correct MLFLOW_TRACKING_URI / tracking.tracking_uri, "
            f"set tracking.allow_fallback: true to fall back to the local store, or tracking.enabled: false."
        )


def _health(uri: str, timeout: float) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(strip_userinfo(uri).rstrip("/") + "/health", timeout=timeout)
        return True, "ok"
    except urllib.error.HTTPError:
        return True, "answered"  # the server answered (e.g. 401/404): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def is_transport_error(exc: BaseException) -> bool:
    """True when ``exc`` says the store could not be reached or could not answer now: a connection refused or
    reset, a timeout, retries used up, an HTTP 5xx answer, MLflow's TEMPORARILY_UNAVAILABLE (e.g. a locked
    database). Only these are kept for a later sync; anything else (a 4xx bad request, a bug) is raised.

    MLflow (3.x) wraps a failed HTTP request as ``MlflowException("API request to ... failed with exception
    ...")`` raised inside the handler of the ``requests`` error, so the cause is found on the exception chain;
    a server's error answer is a ``RestException`` (or, without a JSON body, an ``MlflowException`` "API
    request to endpoint ... failed with error code ..."), judged by its HTTP status.
    """
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        if isinstance(exc, requests.HTTPError):
            return exc.response is not None and exc.response.status_code >= 500
        if isinstance(exc, MlflowException):
            if exc.error_code == "TEMPORARILY_UNAVAILABLE":
                return True
            if isinstance(exc, RestException) or str(exc.message).startswith("API request to endpoint"):
                return exc.get_http_status_code() >= 500  # the server answered with an error
        exc = exc.__cause__ or exc.__context__
    return False


def quiet_mlflow(uri: str) -> None:
    """Lower MLflow's log level; for a server, short HTTP retries (what cannot be sent is kept, see HTTP_RETRY_DEFAULTS)."""
    import logging

    import mlflow  # noqa: F401  (importing it sets its loggers to INFO; lower them after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if is_http(uri):
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)


@contextmanager
def _secret_free(path: Path):
    """Yield ``path``, or a redacted copy of it when a text file inside holds a secret."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]

    def needs(p: Path) -> bool:
        if p.suffix.lower() not in TEXT_SUFFIXES or p.stat().st_size > 5_000_000:
            return False
        text = p.read_text(errors="replace")
        return redact_text(text) != text

    if not any(needs(p) for p in files):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mi_tune_redacted_") as tmp:
        copy = Path(tmp) / path.name
        if path.is_file():
            shutil.copy2(path, copy)
        else:
            shutil.copytree(path, copy)
        for p in [copy] if copy.is_file() else [q for q in copy.rglob("*") if q.is_file()]:
            if needs(p):
                p.write_text(redact_text(p.read_text(errors="replace")))
        yield copy


# ---------------------------------------------------------------------------------------------
# trackers


class NullTracker:
    """Tracking off: every call is accepted and does nothing."""

    run_id = None
    uri = None
    unsent = 0

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_layer_curve(self, per_layer: dict, prefix: str = "probe_") -> None: ...
    def log_downstream(self, results: dict, prefix: str = "downstream_") -> None: ...
    def log_artifacts(self, folder, artifact_path: str | None = None) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def register_adapter(self, run_dir, name: str, model_config: dict | None = None) -> None: ...

    def end(self, status: str = "FINISHED") -> str | None:
        return self.run_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.end("FINISHED" if exc_type is None else "FAILED")
        return False


class MlflowTracker(NullTracker):
    """One MLflow run, written through ``MlflowClient`` (no global fluent state).

    Every call becomes a record ``{"kind": ...}`` that ``_do`` sends; a record that cannot be sent
    because the store does not answer (``is_transport_error``) is appended to ``unsent_path`` (any
    other failure is raised) and ``python -m mi_tune.tracking sync`` replays it through the same
    ``_do``. After a failure against a server, /health is asked at most every OFFLINE_RETRY_S seconds
    and records go straight to the file in between, so a dead server costs training almost nothing.
    """

    def __init__(self, uri: str, run_id: str, unsent_path: Path, owns_run: bool = True):
        from mlflow.tracking import MlflowClient

        self._uri = uri  # may hold credentials; never printed or written
        self.uri = strip_userinfo(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.run_id = run_id
        self.unsent_path = Path(unsent_path)
        self.owns_run = owns_run  # a re-opened training run is not ours to terminate
        self.unsent = 0
        self.unsent_kinds: dict[str, int] = {}
        self._offline_since: float | None = None
        self._last_probe = 0.0
        self._reopened = False  # open() re-opened an existing run (a resumed training)

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, tags: dict, unsent_path: Path, run_id: str | None = None):
        """Create the run in ``experiment`` (creating that if needed), or re-open ``run_id`` when resuming.

        A run that cannot be re-opened is a UserError, never a silent new run: the run folder's
        ``tracking_run.json`` names it, and the rest of the training belongs to it.
        """
        self = cls(uri, "", unsent_path)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception as exc:
                why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                record = self.unsent_path.parent / TRACKING_FILE
                raise UserError(f"tracking: resuming, but MLflow run {run_id} (named in {record}) could not be re-opened at "
                                f"{self.uri} ({redact(why)}). Allowed: the store that holds that run, answering. Fix: point "
                                f"tracking.tracking_uri / MLFLOW_TRACKING_URI at the store the run was started in, resume untracked "
                                f"with tracking.enabled=false, or delete {record} to log the rest of this training to a new MLflow "
                                f"run.") from None
            self.run_id = run_id
            self._reopened = True
            return self
        exp_id = self._experiment_id(experiment)
        tags = {k: str(redact(v)) for k, v in tags.items() if v is not None}
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        return self

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise UserError(f"tracking.experiment: {name!r} is deleted in {self.uri}. Allowed: an active or new experiment. "
                            f"Fix: restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) or set another tracking.experiment.")
        if exp is not None:
            return exp.experiment_id
        kwargs = {}
        if self._uri.startswith("sqlite:///"):  # artifacts next to the database, not in whatever the cwd is
            kwargs["artifact_location"] = (Path(self._uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, **kwargs)
        except MlflowException:  # created meanwhile by a parallel run
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # ---- send, or keep locally ----
    def _submit(self, record: dict) -> bool:
        record = {**record, "run_id": self.run_id, "uri": self.uri}
        if self._offline_since is not None and not self._back_online():
            self._keep(record, None)
            return False
        try:
            self._do(record)
            return True
        except Exception as exc:
            if not is_transport_error(exc):  # a bad request or a bug: fail loudly, never park it in the unsent file
                raise
            # the server went away (or the store is busy): keep going, keep the data
            if is_http(self._uri):
                self._offline_since, self._last_probe = time.time(), time.monotonic()
            self._keep(record, exc)
            return False

    def _back_online(self) -> bool:
        if time.monotonic() - self._last_probe < OFFLINE_RETRY_S:
            return False
        self._last_probe = time.monotonic()
        if not _health(self._uri, timeout=2)[0]:
            return False
        log(f"tracking: {self.uri} answers again; sending new records (the ones kept in {self.unsent_path} still need a sync)")
        self._offline_since = None
        return True

    def _keep(self, record: dict, exc: Exception | None) -> None:
        if self.unsent == 0:
            why = "server unreachable" if exc is None else type(exc).__name__ + (
                f": {str(exc).strip().splitlines()[0][:160]}" if str(exc).strip() else "")
            log(f"tracking: could not send {record['kind']} to {self.uri} ({why}); carrying on, and keeping what is not sent "
                f"in {self.unsent_path}")
        self.unsent += 1
        self.unsent_kinds[record["kind"]] = self.unsent_kinds.get(record["kind"], 0) + 1
        self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.unsent_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _do(self, rec: dict) -> None:
        """Send one record. Used live and by ``sync_unsent``."""
        from mlflow.entities import Metric, Param, RunTag

        kind, run_id = rec["kind"], self.run_id
        if kind == "metrics":
            items = [Metric(k, float(v), rec["timestamp"], rec["step"] or 0) for k, v in rec["metrics"].items()]
            self.client.log_batch(run_id, metrics=items)
        elif kind == "params":
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in rec["params"].items()])
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["tags"].items()])
        elif kind in ("artifact", "artifacts"):
            with _secret_free(Path(rec["path"])) as path:
                if kind == "artifact":
                    self.client.log_artifact(run_id, str(path), rec["artifact_path"])
                else:
                    self.client.log_artifacts(run_id, str(path), rec["artifact_path"])
        elif kind == "register":
            self._register(rec)
        elif kind == "status":
            self.client.set_terminated(run_id, rec["status"])
        else:
            raise ValueError(f"unknown tracking record kind {kind!r}")

    # ---- the public calls ----
    def log_params(self, params: dict) -> None:
        clean = {k: "***" if SECRET_KEY.search(k) and v not in (None, "") else str(redact(v))[:6000] for k, v in params.items()}
        keys = sorted(clean)
        for i in range(0, len(keys), 100):  # MLflow accepts at most 100 params per batch
            self._submit({"kind": "params", "params": {k: clean[k] for k in keys[i: i + 100]}})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if values:
            self._submit({"kind": "metrics", "step": step, "timestamp": int(time.time() * 1000), "metrics": values})

    def log_layer_curve(self, per_layer: dict, prefix: str = "probe_") -> None:
        """``{layer: {"ag_news_recoverability_acc": 0.41, ...}}`` -> metrics ``probe_<name>`` with step = layer
        (the hidden_states index, 0 = embeddings)."""
        for layer in sorted(per_layer, key=int):
            self.log_metrics({_prefixed(prefix, k): v for k, v in _flat(per_layer[layer]).items()}, step=int(layer))

    def log_downstream(self, results: dict, prefix: str = "downstream_") -> None:
        """``{"sts": {"spearman": 0.71}, ...}`` -> metric ``downstream_sts_spearman`` (nested keys joined by ``_``)."""
        self.log_metrics({_prefixed(prefix, k): v for k, v in _flat(results).items()}, step=0)

    def log_artifacts(self, folder, artifact_path: str | None = None) -> None:
        self._submit({"kind": "artifacts", "path": str(Path(folder).resolve()), "artifact_path": artifact_path})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict) -> None:
        self._submit({"kind": "tags", "tags": {k: str(redact(v)) for k, v in tags.items() if v is not None}})

    def register_adapter(self, run_dir, name: str, model_config: dict | None = None) -> None:
        """Log the adapter as an MLflow model (``model/``) and register it as a version of ``name``."""
        self._submit({"kind": "register", "run_dir": str(Path(run_dir).resolve()), "name": name,
                      "model_config": model_config or {}})

    def _register(self, rec: dict) -> None:
        from mlflow.exceptions import MlflowException

        run_dir, name = Path(rec["run_dir"]), rec["name"]
        with tempfile.TemporaryDirectory(prefix="mi_tune_model_") as tmp:
            model_dir, meta = build_mlflow_model(run_dir, Path(tmp) / MODEL_ARTIFACT, rec["model_config"])
            with _secret_free(model_dir) as clean:
                self.client.log_artifacts(self.run_id, str(clean), MODEL_ARTIFACT)
        try:
            self.client.create_registered_model(name, description="LoRA adapters + bag-of-tokens heads trained by mi_tune "
                                                                  "(token recoverability). Load: see each version's description.")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        tags = {"mi_tune.run_name": run_dir.name, "mi_tune.base_model": meta["base_model"], "mi_tune.layer": meta["layer"],
                "mi_tune.pooling": meta["pooling"], **{k: v for k, v in meta.get("scores", {}).items()}}
        mv = self.client.create_model_version(name, source, run_id=self.run_id, tags={k: str(v) for k, v in tags.items()},
                                              description=load_snippet(name, None))
        self.client.update_model_version(name, mv.version, description=load_snippet(name, mv.version))
        self.client.set_tag(self.run_id, "mi_tune.registered_model", f"models:/{name}/{mv.version}")
        log(f"tracking: adapter registered as models:/{name}/{mv.version}")

    def end(self, status: str = "FINISHED") -> str | None:
        if self.owns_run:
            self._submit({"kind": "status", "status": status})
        if self.unsent:
            kinds = ", ".join(f"{n} {k}" for k, n in self.unsent_kinds.items())
            log(f"tracking: {self.unsent} record(s) did not reach {self.uri} ({kinds}). Nothing is lost: they are in "
                f"{self.unsent_path}. When the server answers again, send them with:\n"
                f"    python -m mi_tune.tracking sync {self.unsent_path}")
        return self.run_id


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prefixed(prefix: str, key: str) -> str:
    return key if key.startswith(prefix) else prefix + key


# ---------------------------------------------------------------------------------------------
# opening runs


def start_tracking(settings: TrackingSettings, run_name: str, run_dir: Path, tags: dict, run_id: str | None = None):
    """Open (or re-open, when resuming) the MLflow run of a training; NullTracker when tracking is off."""
    if not settings.enabled:
        return NullTracker()
    uri = resolve_uri(settings)
    try:
        check_reachable(uri)
    except UserError:
        if not settings.allow_fallback:
            raise
        resumed = f"; run {run_id} stays there and this launch logs to a new run" if run_id else ""
        log(f"tracking: {strip_userinfo(uri)} unreachable; tracking.allow_fallback is true, so the run goes to the local store "
            f"{default_uri()} (tagged mi_tune.tracking_fallback_from){resumed}")
        tags = {**tags, "mi_tune.tracking_fallback_from": strip_userinfo(uri)}
        uri, run_id = default_uri(), None
    quiet_mlflow(uri)
    try:
        tracker = MlflowTracker.open(uri, settings.experiment, run_name, tags, Path(run_dir) / UNSENT_FILE, run_id)
    except UserError:
        raise
    except Exception as exc:  # reachable but refusing (credentials, permissions, a broken store)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"tracking: could not open a run in experiment {settings.experiment!r} at {strip_userinfo(uri)} ({first}). "
                        f"Allowed: a store that accepts runs. Fix: check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / "
                        f"MLFLOW_TRACKING_TOKEN and tracking.tracking_uri, or set tracking.enabled: false.") from None
    log(f"tracking: MLflow run {tracker.run_id} at {tracker.uri} ({'re-opened to resume, ' if run_id else ''}experiment {settings.experiment!r})")
    return tracker


def ensure_params(tracker, params: dict) -> None:
    """Log ``params`` on a new run; on a re-opened run, log those it does not have yet.

    A training cut between creating its run (``tracking_run.json`` written) and logging its params
    left a run without them: the resumed launch logs them then. Params a run already holds are not
    sent again (MLflow refuses a param whose value changes, and ``tracking.*`` may differ on resume).
    """
    if not isinstance(tracker, MlflowTracker):
        return
    have: set = set()
    if tracker._reopened and tracker._offline_since is None:
        try:
            have = set(tracker.client.get_run(tracker.run_id).data.params)
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            # the store does not answer: log them all; they wait in the unsent file like any other record
    missing = {k: v for k, v in params.items() if k not in have}
    if tracker._reopened and missing:
        log(f"tracking: run {tracker.run_id} lacks {len(missing)} of its {len(params)} params (an earlier launch stopped before "
            f"logging them); logging them now")
    if missing:
        tracker.log_params(missing)


def reopen_run(run_dir, child: str | None = None, tags: dict | None = None):
    """Attach results to the training run of ``run_dir`` (read from its ``tracking_run.json``).

    ``child=None``: metrics and artifacts go to the training run itself (the run stays as it was:
    ``end()`` does not change its status). ``child="probe"``: a child run of it, named so and
    tagged ``mlflow.parentRunId``, which ``end()`` terminates. Use it as a context manager::

        from mi_tune.tracking import reopen_run
        with reopen_run("adapters/my-run") as t:
            t.log_layer_curve({0: {"ag_news_recoverability_acc": 0.31}, 1: {...}})
            t.log_downstream({"sts_b": {"spearman": 0.74}})
            t.log_artifact("adapters/my-run/probe.json", "eval")

    No ``tracking_run.json`` (tracking was off) -> a NullTracker. A server that does not answer ->
    records are kept in ``<run_dir>/tracking_unsent.jsonl`` for ``python -m mi_tune.tracking sync``;
    evaluation never fails because of tracking, and never writes to an orphan run.
    """
    run_dir = Path(run_dir)
    path = run_dir / TRACKING_FILE
    if not path.exists():
        log(f"tracking: {run_dir} has no {TRACKING_FILE} (it was trained with tracking off); results are not tracked")
        return NullTracker()
    info = json.loads(path.read_text())
    uri, run_id = info["tracking_uri"], info["run_id"]
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        log(f"tracking: the store of {run_dir} ({uri}) is not on this machine; results are not tracked")
        return NullTracker()
    quiet_mlflow(uri)
    parent = MlflowTracker(uri, run_id, run_dir / UNSENT_FILE, owns_run=False)
    try:
        run = parent.client.get_run(run_id)
    except Exception as exc:
        if is_http(uri) and is_transport_error(exc):  # server down: keep everything for a later sync, into the right run
            log(f"tracking: {parent.uri} does not answer ({type(exc).__name__}); results are kept in {parent.unsent_path}")
            parent._offline_since, parent._last_probe = time.time(), time.monotonic()
            return parent
        raise UserError(f"tracking: run {run_id} named in {path} is not in {parent.uri} ({type(exc).__name__}). Allowed: the store "
                        f"the run was trained with. Fix: point {path} at the right tracking_uri, or delete it to evaluate untracked.") from None
    if child is None:
        log(f"tracking: attaching results to run {run_id} at {parent.uri}")
        return parent
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    child_tags = {MLFLOW_PARENT_RUN_ID: run_id, **{k: str(redact(v)) for k, v in (tags or {}).items() if v is not None}}
    child_run = parent.client.create_run(run.info.experiment_id, run_name=child, tags=child_tags)
    log(f"tracking: results go to child run {child_run.info.run_id} ({child!r}) of run {run_id} at {parent.uri}")
    return MlflowTracker(uri, child_run.info.run_id, run_dir / UNSENT_FILE, owns_run=True)


# ---------------------------------------------------------------------------------------------
# end of training: the run folder, eval results, the registered adapter


def log_run_outputs(tracker, run_dir: Path, recipe) -> None:
    """Log eval results found in ``metrics.json``, the run folder's files, and register the adapter.

    ``metrics.json`` may hold ``probe`` (``{layer: {metric: value}}``) and ``downstream``
    (``{task: {metric: value}}``) sections; they become ``probe_*`` / ``downstream_*`` metrics.
    The adapter weights and head are uploaded once, inside ``model/``; checkpoints stay local.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    final = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if isinstance(final.get("probe"), dict):
        tracker.log_layer_curve(final["probe"])
    if isinstance(final.get("downstream"), dict):
        tracker.log_downstream(final["downstream"])
    for item in sorted(run_dir.iterdir()):
        if item.name in LOCAL_ONLY or item.name in ADAPTER_ONLY or item.name.endswith(".tmp"):
            continue
        if item.is_dir():
            tracker.log_artifacts(item, item.name)
        else:
            tracker.log_artifact(item)
    if (run_dir / "adapter_model.safetensors").exists():
        tracker.register_adapter(run_dir, registered_model_name(recipe), default_model_config(recipe))


def default_model_config(recipe) -> dict:
    """What the registered model needs at load time; every key can be overridden by the loader."""
    source = recipe.model.source
    local = Path(source).expanduser()
    # A local base model is recorded by absolute path, so that loading works from any working directory
    # on this machine; elsewhere pass model_config={"base_model": ...}.
    base = str(local.resolve()) if local.exists() else source
    return {"base_model": base, "max_length": recipe.data.max_length, "batch_size": 32}


def load_snippet(name: str, version) -> str:
    uri = f"models:/{name}/{version if version is not None else '<version>'}"
    return (f"Embeddings of the enhanced model (the head's layer and pooling):\n\n"
            f"    import mlflow\n    m = mlflow.pyfunc.load_model({uri!r})\n"
            f"    vectors = m.predict([\"a sentence\", \"another one\"])   # (N, D) float32\n"
            f"    ready = m.get_raw_model()   # mi_tune ReadyModel: .model (PeftModel), .head, .tokenizer\n\n"
            f"The plain PEFT folder: mlflow.artifacts.download_artifacts({uri!r}) + '/data/{MODEL_DATA}', then\n"
            f"PeftModel.from_pretrained(base_model, that_folder). Another base path: load_model(uri, model_config={{\"base_model\": ...}}).")


def build_mlflow_model(run_dir: Path, dst: Path, model_config: dict) -> tuple[Path, dict]:
    """Write an MLflow pyfunc model whose loader is this module and whose data is the adapter folder."""
    import mlflow
    import numpy as np
    import peft
    import safetensors
    import torch
    import transformers
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from . import __version__

    head_cfg = json.loads((run_dir / "head" / "config.json").read_text()) if (run_dir / "head" / "config.json").exists() else {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    scores = {}
    for m in ("base", "enhanced"):
        r = metrics.get("heldout_check", {}).get("heldout", {}).get(m, {})
        if "recoverability_acc" in r:
            scores[f"heldout_{m}_recoverability_acc"] = r["recoverability_acc"]
    meta = {"base_model": model_config.get("base_model") or head_cfg.get("base_model", ""), "layer": head_cfg.get("layer"),
            "pooling": head_cfg.get("pooling"), "scores": scores}
    with tempfile.TemporaryDirectory(prefix="mi_tune_stage_") as tmp:
        stage = Path(tmp) / MODEL_DATA
        stage.mkdir()
        for name in ADAPTER_FILES:
            if (run_dir / name).exists():
                (stage / name).symlink_to((run_dir / name).resolve())  # followed when MLflow copies the data folder
        mlflow_model = Model()
        mlflow_model.add_flavor("mi_tune", adapter=f"data/{MODEL_DATA}", peft_type="LORA", mi_tune_version=__version__,
                                base_model=meta["base_model"], layer=meta["layer"], pooling=meta["pooling"])
        signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(head_cfg.get("hidden_size", -1))))]))
        requirements = [f"mi_tune=={__version__}"] + [f"{m.__name__}=={m.__version__.split('+')[0]}"
                                                       for m in (torch, transformers, peft, safetensors, mlflow)]
        with warnings.catch_warnings():  # no input example on purpose: MLflow would load the base model to check it
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.save_model(str(dst), loader_module=__name__, data_path=str(stage), mlflow_model=mlflow_model,
                                     signature=signature, pip_requirements=requirements, model_config=model_config)
    return dst, meta


class AdapterEmbedder:
    """What ``mlflow.pyfunc.load_model`` wraps: texts in, enhanced sentence embeddings out.

    ``predict`` takes a list of strings, a string, or a DataFrame with a ``text`` column, and returns
    (N, D) float32 embeddings at the head's layer and pooling. ``get_raw_model()`` returns the
    ``ReadyModel`` (PeftModel, head, tokenizer) for anything else.
    """

    def __init__(self, ready, max_length: int = 128, batch_size: int = 32):
        self.ready = ready
        self.max_length = max_length
        self.batch_size = batch_size

    def predict(self, model_input, params: dict | None = None):
        from .embedding import embed_texts

        texts = _texts(model_input)
        layer, pooling = self.ready.default_layer_pooling()
        return embed_texts(self.ready.model, self.ready.tokenizer, texts, layer=layer, pooling=pooling,
                           max_length=self.max_length, batch_size=self.batch_size)

    def get_raw_model(self):
        return self.ready


def _texts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[col].tolist()]
    return [str(t) for t in list(model_input)]


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> AdapterEmbedder:
    """MLflow's entry point for ``mlflow.pyfunc.load_model`` on a model written by ``build_mlflow_model``."""
    from .loading import load_ready

    cfg = {"base_model": None, "max_length": 128, "batch_size": 32, **(model_config or {})}
    ready = load_ready(cfg["base_model"], adapter=str(data_path))
    return AdapterEmbedder(ready, int(cfg["max_length"]), int(cfg["batch_size"]))


# ---------------------------------------------------------------------------------------------
# replaying what was kept locally


def sync_unsent(path: str | Path, run_id: str | None = None, uri: str | None = None) -> int:
    """Replay a ``tracking_unsent.jsonl`` file. Returns the number of records sent.

    Each record names its run and (credential-free) store; ``run_id`` / ``uri`` override them. A store
    that does not answer stops the sync; a record the store refuses is kept and the others go on. What
    was not sent stays in the file, so running the same command again is safe; once everything is
    sent the file is renamed ``tracking_unsent.synced-<time>.jsonl``.
    """
    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    trackers: dict[tuple, MlflowTracker] = {}
    kept, errors, sent = [], [], 0
    for i, rec in enumerate(records):
        target = (run_id or rec["run_id"], uri or rec["uri"])
        try:
            if target not in trackers:
                quiet_mlflow(target[1])
                t = MlflowTracker(target[1], target[0], path, owns_run=False)
                t.client.get_run(target[0])  # fails clearly if the run is not in that store
                trackers[target] = t
            trackers[target]._do(rec)
            sent += 1
        except Exception as exc:
            errors.append(f"{rec['kind']} for run {target[0]} at {strip_userinfo(target[1])}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            if is_http(target[1]) and not _health(target[1], timeout=5)[0]:
                kept += records[i:]  # the server is gone: stop here, keep the rest in order
                break
            kept.append(rec)
    if kept:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        raise UserError(f"sync: sent {sent} record(s); {len(kept)} record(s) remain in {path}. First problem: {errors[0]}. Allowed: "
                        f"the store that holds the run, answering. Fix: start the server (or pass --tracking-uri / --run-id) and "
                        f"run the same command again.")
    os.replace(path, path.with_name(f"{path.stem}.synced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
    return sent


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .errors import cli_main

    @cli_main
    def run():
        p = argparse.ArgumentParser(prog="python -m mi_tune.tracking", description="Tracking utilities.")
        sub = p.add_subparsers(dest="cmd", required=True)
        s = sub.add_parser("sync", help="send what a run kept locally while the tracking server was unreachable")
        s.add_argument("path", help="a run folder's tracking_unsent.jsonl (or the run folder)")
        s.add_argument("--run-id", default=None, help="send to this run instead of the one each record names")
        s.add_argument("--tracking-uri", default=None, help="send to this store instead of the one each record names "
                                                            "(credentials: MLflow's MLFLOW_TRACKING_* variables)")
        a = p.parse_args(argv)
        target = Path(a.path)
        if target.is_dir():
            target = target / UNSENT_FILE
        if not target.is_file():
            raise UserError(f"sync: {a.path} does not exist. Allowed: a run folder's {UNSENT_FILE} (written when the tracking "
                            f"server could not be reached). Fix: check the path; nothing to sync if the run printed no sync command.")
        n = sync_unsent(target, a.run_id, a.tracking_uri)
        print(f"sent {n} record(s) from {target}")

    run()


if __name__ == "__main__":
    main()
