"""Secrets stay on this machine: what is redacted from params, tags, text artifacts, error messages and model cards.

- ``redact(value, *also)``: the value of any secret found in the environment (``SECRET_ENV``) or passed in ``also``
  (e.g. a Hub token read from the login cache), and credentials written inside a URI
  (``http://user:pw@host`` -> ``http://***@host``);
- ``redact_text(text, *also)``: that, plus the value of credential-looking keys in YAML / JSON text
  (``hub_token: hf_...`` -> ``hub_token: '***'``), whatever the environment holds;
- ``SECRET_KEY``: a param name that looks like a credential (``training.hub_token``), logged as ``***``;
- ``strip_userinfo(uri)``: the URI without its credentials, for files and messages.

The one redactor: used by the tracker, the upload policy (``run_files.py``), the adapter loader and the Hub
code; imports nothing of mi_tune.
"""

from __future__ import annotations

import os
import re

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING")
# A param whose last name part looks like a credential (training.hub_token) is logged as "***".
# Anchored at the end so that tokenizer / include_num_input_tokens_seen stay visible.
SECRET_KEY = re.compile(r"(^|[._-])([a-z0-9]*_)?(token|password|passwd|secret|api_key|access_key|credentials?)$", re.I)
URI_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
# In text files (YAML/JSON), the value of a credential-looking key, whatever the environment holds at upload time
# (a `sync` may run in a shell without the secret set): `hub_token: hf_...` -> `hub_token: '***'`.
# A tokenizer's special tokens (eos_token: "</s>") are not credentials: a pushed tokenizer_config.json must stay usable.
_NOT_SECRET = r"(?!(?:bos|eos|pad|unk|sep|cls|mask|additional_special)_token\b)"
YAML_SECRET = re.compile(r"(?im)^(\s*" + _NOT_SECRET + r"[\w.-]*(?:token|password|passwd|secret|api_key|access_key)\s*:[ \t]+)"
                         r"(?!(?:null|~|''|\"\")\s*$)(\S.*)$")
JSON_SECRET = re.compile(r'(?i)("' + _NOT_SECRET + r'[\w.-]*(?:token|password|passwd|secret|api_key|access_key)"\s*:\s*)"[^"]*"')


def strip_userinfo(uri: str) -> str:
    """``http://user:pw@host`` -> ``http://host``: credentials belong in MLflow's env variables, not in files."""
    return URI_USERINFO.sub(r"\1", uri) if uri else uri


def redact(value, *also: str | None):
    """Replace any secret from the environment or ``also``, and credentials inside URIs, in a string value."""
    if isinstance(value, str):
        for secret in [os.environ.get(name) for name in SECRET_ENV] + list(also):
            if secret and len(secret) >= 4 and secret in value:
                value = value.replace(secret, "***")
        value = URI_USERINFO.sub(r"\1***@", value)
    return value


def redact_text(text: str, *also: str | None) -> str:
    """``redact`` plus credential-looking keys in YAML / JSON text."""
    text = YAML_SECRET.sub(r"\1'***'", text)
    text = JSON_SECRET.sub(r'\1"***"', text)
    return redact(text, *also)
