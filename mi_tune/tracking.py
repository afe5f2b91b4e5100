"""MLflow tracking with the same calls whether tracking is on or off (``NullTracker``).

Default store: ``sqlite:///mlruns.db`` in the working directory with artifacts in ``./mlartifacts``;
``$MLFLOW_TRACKING_URI`` or the recipe's ``tracking.tracking_uri`` name another (MLflow's own
auth variables apply). If the server goes away mid-run, metrics are kept in
``<run_dir>/tracking_unsent.jsonl`` and the end of the run says so; nothing is lost.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

from .config import TrackingSettings
from .errors import UserError
from .modeling import log

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SECRET_KEY = re.compile(r"(token|password|secret|api_key)", re.I)


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def resolve_uri(settings: TrackingSettings) -> str:
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def redact(value):
    """Replace any secret from the environment inside a string value."""
    if isinstance(value, str):
        for name in SECRET_ENV:
            secret = os.environ.get(name)
            if secret and len(secret) >= 4 and secret in value:
                value = value.replace(secret, "***")
    return value


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


class NullTracker:
    run_id = None
    uri = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_artifacts(self, folder, artifact_path: str | None = None) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def end(self, status: str = "FINISHED") -> str | None:
        return None


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict, unsent_path: Path, run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            kwargs = {}
            if uri.startswith("sqlite:") and uri == default_uri():
                kwargs["artifact_location"] = (Path.cwd() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(experiment, **kwargs)
        else:
            exp_id = exp.experiment_id
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items() if v is not None}).info.run_id
        self.unsent_path = unsent_path
        self.unsent = 0
        self._mlflow = mlflow

    def _safe(self, what: str, fn, record: dict | None = None) -> None:
        try:
            fn()
        except Exception as exc:  # the server went away: keep going, keep the data locally
            self.unsent += 1
            if self.unsent == 1:
                log(f"tracking: could not send {what} to {self.uri} ({type(exc).__name__}); keeping it in {self.unsent_path}")
            if record is not None:
                self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.unsent_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        clean = {k: str(redact(v))[:6000] for k, v in params.items() if not SECRET_KEY.search(k)}
        items = [Param(k, v) for k, v in clean.items()]
        for i in range(0, len(items), 100):
            chunk = items[i: i + 100]
            self._safe("params", lambda c=chunk: self.client.log_batch(self.run_id, params=c),
                       {"kind": "params", "params": {p.key: p.value for p in chunk}})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if items:
            self._safe("metrics", lambda: self.client.log_batch(self.run_id, metrics=items),
                       {"kind": "metrics", "step": step, "timestamp": ts, "metrics": {m.key: m.value for m in items}})

    def log_artifacts(self, folder, artifact_path: str | None = None) -> None:
        self._safe("artifacts", lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path),
                   {"kind": "artifacts", "folder": str(folder), "artifact_path": artifact_path})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._safe("artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
                   {"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._safe("tags", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(redact(v))), {"kind": "tag", "key": k, "value": str(v)})

    def end(self, status: str = "FINISHED") -> str | None:
        self._safe("run status", lambda: self.client.set_terminated(self.run_id, status), {"kind": "status", "status": status})
        if self.unsent:
            log(f"tracking: {self.unsent} call(s) did not reach {self.uri}; they are in {self.unsent_path}. "
                f"Sync them later with: python -m mi_tune.tracking sync {self.unsent_path} --run-id {self.run_id}")
        return self.run_id


def log_run_outputs(tracker, run_dir: Path, recipe) -> None:
    """Log the run folder (adapter, head, recipe, metrics) as artifacts; checkpoints stay local."""
    for item in sorted(Path(run_dir).iterdir()):
        if item.name in ("checkpoints",) or item.name.endswith(".tmp"):
            continue
        if item.is_dir():
            tracker.log_artifacts(item, f"adapter/{item.name}")
        else:
            tracker.log_artifact(item, "adapter")


def check_reachable(uri: str) -> None:
    """Raise UserError if an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
    except urllib.error.HTTPError:
        return  # the server answered (e.g. 401/404): reachable
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"tracking.tracking_uri: the MLflow server at {uri} is unreachable ({reason}). Allowed: a running tracking server, "
            f"or the local store. Fix: start the server, correct MLFLOW_TRACKING_URI / tracking.tracking_uri, set "
            f"tracking.allow_fallback: true to fall back to the local store, or tracking.enabled: false."
        ) from None


def start_tracking(settings: TrackingSettings, run_name: str, run_dir: Path, tags: dict, run_id: str | None = None):
    """Open (or re-open, when resuming) the MLflow run; NullTracker when tracking is off."""
    if not settings.enabled:
        return NullTracker()
    uri = resolve_uri(settings)
    try:
        check_reachable(uri)
    except UserError:
        if not settings.allow_fallback:
            raise
        log(f"tracking: {uri} unreachable; falling back to the local store {default_uri()} (recorded as a tag)")
        tags = {**tags, "mi_tune.tracking_fallback_from": uri}
        uri = default_uri()
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    tracker = MlflowTracker(uri, settings.experiment, run_name, tags, run_dir / "tracking_unsent.jsonl", run_id)
    log(f"tracking: MLflow run {tracker.run_id} at {uri}")
    return tracker


def sync_unsent(path: str, run_id: str, uri: str | None = None) -> int:
    """Replay a tracking_unsent.jsonl file into its run. Returns the number of records sent."""
    tracker = MlflowTracker.__new__(MlflowTracker)
    from mlflow.tracking import MlflowClient

    tracker.client = MlflowClient(tracking_uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri())
    tracker.run_id = run_id
    sent = 0
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        from mlflow.entities import Metric, Param

        if rec["kind"] == "metrics":
            tracker.client.log_batch(run_id, metrics=[Metric(k, v, rec["timestamp"], rec["step"] or 0) for k, v in rec["metrics"].items()])
        elif rec["kind"] == "params":
            tracker.client.log_batch(run_id, params=[Param(k, v) for k, v in rec["params"].items()])
        elif rec["kind"] == "artifacts":
            tracker.client.log_artifacts(run_id, rec["folder"], rec["artifact_path"])
        elif rec["kind"] == "artifact":
            tracker.client.log_artifact(run_id, rec["path"], rec["artifact_path"])
        elif rec["kind"] == "tag":
            tracker.client.set_tag(run_id, rec["key"], rec["value"])
        elif rec["kind"] == "status":
            tracker.client.set_terminated(run_id, rec["status"])
        sent += 1
    return sent


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .errors import cli_main

    @cli_main
    def run():
        p = argparse.ArgumentParser(prog="python -m mi_tune.tracking", description="Tracking utilities.")
        sub = p.add_subparsers(dest="cmd", required=True)
        s = sub.add_parser("sync", help="send metrics kept locally while the server was unreachable")
        s.add_argument("path")
        s.add_argument("--run-id", required=True)
        s.add_argument("--tracking-uri", default=None)
        a = p.parse_args(argv)
        if not Path(a.path).is_file():
            raise UserError(f"sync: {a.path} does not exist. Allowed: a tracking_unsent.jsonl file from a run folder. Fix: check the path.")
        n = sync_unsent(a.path, a.run_id, a.tracking_uri)
        print(f"sent {n} record(s) to run {a.run_id}")

    run()


if __name__ == "__main__":
    main()
