"""Where MLflow runs go, and whether the store answers.

The embedded store by default (``sqlite:///<cwd>/mlruns.db``, artifacts in ``<cwd>/mlartifacts``), or a server
named by the recipe's ``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI``; MLflow's own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN`` apply. Used by the run
tracker (``tracking.py``) and ``python -m mi_tune.compare``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import TrackingSettings
from .errors import UserError
from .redaction import strip_userinfo

# MLflow's HTTP client retries a dead server for ~4 minutes per call by default. Our tracker keeps
# what it cannot send, so long retries would only stall training; these apply unless already set.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def resolve_uri(settings: TrackingSettings) -> str:
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def is_http(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


def check_reachable(uri: str) -> None:
    """Raise UserError if an http(s) tracking server does not answer."""
    if not is_http(uri):
        return
    ok, reason = health(uri, timeout=5)
    if not ok:
        raise UserError(
            f"tracking.tracking_uri: the MLflow server at {strip_userinfo(uri)} is unreachable ({reason}). Allowed: a running "
            f"tracking server, or the local store. Fix: start the server, correct MLFLOW_TRACKING_URI / tracking.tracking_uri, "
            f"set tracking.allow_fallback: true to fall back to the local store, or tracking.enabled: false."
        )


def health(uri: str, timeout: float) -> tuple[bool, str]:
    """(reachable, why) from the server's ``/health`` page; any HTTP answer counts as reachable."""
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
