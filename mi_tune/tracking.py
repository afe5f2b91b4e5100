"""The run tracker: MLflow tracking with the same calls whether tracking is on or off (``NullTracker``), its
offline queue, and ``python -m mi_tune.tracking sync``.

One run per training (``train.py``), in the store of ``mlflow_store.py``: params = the flattened resolved
recipe (long values whole in the ``recipe.yaml`` artifact), tags, per-step metrics, and as artifacts the run
folder's files (eval JSON and plots too; no checkpoints or caches: ``run_files.py``) and ``model/``, the
adapter as a registered MLflow model (``mlflow_model.py``). Secrets never reach params, tags or text
artifacts (``redaction.py``).

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
import time
from pathlib import Path

from .config import TrackingSettings
from .errors import UserError, log
from .mlflow_model import ADAPTER_ONLY, default_model_config, register_model_version, registered_model_name
from .mlflow_model import _load_pyfunc  # noqa: F401  (models registered before the split name mi_tune.tracking as loader)
from .mlflow_store import check_reachable, default_uri, health, is_http, is_transport_error, quiet_mlflow, resolve_uri
from .redaction import SECRET_KEY, redact, strip_userinfo
from .run_files import local_reason, shareable
from .runs import METRICS_FILE, TRACKING_FILE, UNSENT_FILE

OFFLINE_RETRY_S = 30.0  # once a server failed, ask /health at most this often before sending again


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
        if not health(self._uri, timeout=2)[0]:
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
            with shareable(Path(rec["path"])) as path:
                if kind == "artifact":
                    self.client.log_artifact(run_id, str(path), rec["artifact_path"])
                else:
                    self.client.log_artifacts(run_id, str(path), rec["artifact_path"])
        elif kind == "register":
            register_model_version(self.client, run_id, Path(rec["run_dir"]), rec["name"], rec["model_config"])
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
    The adapter weights and head are uploaded once, inside ``model/``; what stays local (checkpoints, caches, ...)
    is decided by ``run_files.local_reason``, for the folders inside too.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    final = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if isinstance(final.get("probe"), dict):
        tracker.log_layer_curve(final["probe"])
    if isinstance(final.get("downstream"), dict):
        tracker.log_downstream(final["downstream"])
    for item in sorted(run_dir.iterdir()):
        if local_reason(item) or item.name in ADAPTER_ONLY:
            continue
        if item.is_dir():
            tracker.log_artifacts(item, item.name)
        else:
            tracker.log_artifact(item)
    if (run_dir / "adapter_model.safetensors").exists():
        tracker.register_adapter(run_dir, registered_model_name(recipe), default_model_config(recipe))


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
            if is_http(target[1]) and not health(target[1], timeout=5)[0]:
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
