"""Share a run folder on the Hugging Face Hub: the PEFT adapter, the head, the recipe, the results and
plots, and the run's model card (``card.py``). What stays local: ``run_files.py``.

``plan_push`` decides, without any network, exactly what would be uploaded (``--dry-run`` prints it);
``push_run`` uploads that plan in one commit through ``HfApi.create_repo(exist_ok=True)`` +
``HfApi.create_commit``. Pushing the same folder again is safe: the repo is reused and files whose
content did not change are skipped by the Hub client, so an unchanged folder makes no new commit.
Nothing in the run folder is ever changed or deleted; the model card replaces the local README.md
only in the upload.

The token comes from the usual places (``HF_TOKEN``, else the ``hf auth login`` cache) through
``huggingface_hub.get_token()``; it is handed to ``HfApi`` and never printed, logged or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .card import DESCRIBE, build_card
from .errors import UserError, log
from .redaction import redact, redact_text
from .run_files import hub_files, redacted
from .runs import README_FILE

# The adapter is not a finished run without these (the card and the loader need them).
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
OFFLINE_MESSAGE = ("push: HF_HUB_OFFLINE is set, so no request may leave this machine. Allowed: pushing with network access. "
                   "Fix: unset HF_HUB_OFFLINE (or set it to 0) and run again.")


@dataclass
class PushPlan:
    run_dir: Path
    repo_id: str
    files: dict[str, Path | bytes]  # path in repo -> local file, or bytes (the card, redacted text)
    skipped: list[tuple[str, str]]  # (path in the run folder, why it stays local)
    card: object  # huggingface_hub.ModelCard
    notes: list[str] = field(default_factory=list)

    def size(self, path: str) -> int:
        src = self.files[path]
        return len(src) if isinstance(src, bytes) else src.stat().st_size

    def describe(self, private: bool | None = None) -> str:
        vis = "" if private is None else f" ({'private' if private else 'public'} if the repo is new)"
        lines = [f"would push {len(self.files)} files from {self.run_dir} to {self.repo_id}{vis}:"]
        width = max(len(p) for p in self.files)
        for p in self.files:
            what = "model card, generated" if p == README_FILE else DESCRIBE.get(p, "evaluation output")
            lines.append(f"  {p:<{width}}  {_human(self.size(p)):>9}  {what}")
        if self.skipped:
            lines.append("not pushed:")
            lines += [f"  {p}  ({why})" for p, why in self.skipped]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class PushResult:
    plan: PushPlan
    repo_url: str
    commit_url: str
    commit_oid: str
    unchanged: list[str]  # files the Hub already had with the same content (skipped by the client)


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# ---------------------------------------------------------------------------------------------
# what is pushed


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UserError(f"run folder: {str(run_dir)!r} does not exist. Allowed: a run folder written by python -m mi_tune.train "
                        f"(adapters/<run>). Fix: check the path; ls adapters/ lists the runs.")
    missing = [f for f in REQUIRED if not (run_dir / f).exists()]
    if missing:
        raise UserError(f"run folder: {run_dir} has no {' and no '.join(missing)}. Allowed: a finished run folder (the adapter is "
                        f"saved at the end of training). Fix: finish the run (re-running python -m mi_tune.train with the same "
                        f"recipe resumes it), or point at another run folder.")


def parse_include(spec: str) -> tuple[Path, str]:
    """``DIR`` or ``DIR:PATH_IN_REPO`` -> (folder, repo prefix). The prefix defaults to the folder's name."""
    folder, _, dest = spec.partition(":")
    path = Path(folder).expanduser()
    dest = (dest or path.name).strip("/")
    if not path.is_dir() or not dest or ".." in dest.split("/"):
        raise UserError(f"--include: got {spec!r}; allowed: an existing results folder, optionally with :PATH_IN_REPO (e.g. "
                        f"outputs/probe/smollm2:probe). Fix: check the folder (probe results default to outputs/probe/<name>).")
    return path, dest


def plan_push(run_dir: str | Path, repo_id: str, base_model: str | None = None, license: str | None = None,
              token: str | None = None, include: list[str] | None = None) -> PushPlan:
    """Exactly what ``push_run`` would upload: the run folder's shareable files, extra results folders
    (``include``: ``DIR`` or ``DIR:PATH_IN_REPO``), text redacted of secrets, and the generated model card."""
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    check_run_dir(run_dir)
    sources, skipped = hub_files(run_dir)
    for spec in include or []:
        folder, dest = parse_include(spec)
        extra, extra_skipped = hub_files(folder, dest + "/")
        clash = sorted(set(extra) & set(sources))
        if clash:
            raise UserError(f"--include: {spec!r} would overwrite {', '.join(clash[:3])} from the run folder. Allowed: a path in "
                            f"the repo that is free. Fix: name another one, e.g. {folder}:results/{folder.name}.")
        sources.update(extra)
        skipped += extra_skipped
    files: dict[str, Path | bytes] = {}
    for rel, path in sources.items():
        clean = redacted(path, token)
        files[rel] = path if clean is None else clean.encode()
    card, notes = build_card(run_dir, sources, repo_id, base_model, license)
    files[README_FILE] = redact_text(str(card), token).encode()
    files = dict(sorted(files.items()))
    return PushPlan(run_dir, repo_id, files, skipped, card, notes)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        ok = "/" in (repo_id or "")
    except HFValidationError:
        ok = False
    if not ok:
        raise UserError(f"--repo-id: got {repo_id!r}; allowed: owner/name with letters, digits, '-', '_', '.' (no '--' or '..', "
                        f"at most 96 characters). Fix: e.g. --repo-id your-name/smollm2-135m-recoverability.")


# ---------------------------------------------------------------------------------------------
# pushing


def _find(exc: BaseException, types_) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types_):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def hub_error(exc: Exception, repo_id: str, run_dir: Path, token: str | None) -> UserError:
    """One paragraph for a failed push (what, value, allowed, fix), secrets removed."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    safe = (f" Nothing was deleted locally: {run_dir} is unchanged, and pushing again is safe (files already on the Hub "
            f"are skipped): python -m mi_tune.push {run_dir} --repo-id {repo_id}")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if _find(exc, OfflineModeIsEnabled):
        msg = OFFLINE_MESSAGE
    elif (net := _find(exc, httpx2.TransportError)) is not None:
        msg = (f"push: could not reach the Hub at {constants.ENDPOINT} ({type(net).__name__}: "
               f"{(str(net).strip().splitlines() or [''])[0]}). Allowed: a machine with network access to the Hub (or "
               f"HF_ENDPOINT set to a reachable mirror). Fix: check your network or proxy, then run the same command again.")
    elif (http := _find(exc, HfHubHTTPError)) is not None:
        status = getattr(getattr(http, "response", None), "status_code", None)
        if status == 401:
            msg = (f"push: the Hub rejected the token (401) for {repo_id!r}. Allowed: a valid token with write access. "
                   f"Fix: run hf auth login, or set HF_TOKEN to a write token from https://huggingface.co/settings/tokens.")
        elif status == 403:
            msg = (f"push: the token has no write access to {repo_id!r} (403). Allowed: a repo under your user or an "
                   f"organization where you can write. Fix: use --repo-id YOUR-NAME/..., or a token with write scope.")
        elif status == 404:
            msg = (f"push: the Hub says {repo_id!r} does not exist or is not visible to this token (404). Allowed: a repo "
                   f"you own or can write to. Fix: check the owner part of --repo-id and that the token belongs to it.")
        else:
            msg = f"push: the Hub answered {status} for {repo_id!r} ({first}). Fix: run the same command again later."
    elif isinstance(exc, ValueError) and "metadata" in str(exc):
        msg = (f"push: the Hub rejected the model card metadata ({' '.join(str(exc).split())}). Allowed: valid card "
               f"metadata. Fix: check --base-model and --license (e.g. --license apache-2.0).")
    else:
        msg = f"push: uploading to {repo_id!r} failed ({type(exc).__name__}: {first})."
    return UserError(redact(msg + safe, token))


def push_run(run_dir: str | Path, repo_id: str, private: bool = True, *, base_model: str | None = None,
             license: str | None = None, include: list[str] | None = None, revision: str | None = None,
             commit_message: str | None = None) -> PushResult:
    """Push a run folder to ``repo_id`` (created if missing, reused if present) in one commit; returns what happened.

    ``private`` applies only when the repo is created; an existing repo keeps its visibility. ``revision``: a
    branch, created from main when missing. ``include``: extra results folders (``DIR`` or ``DIR:PATH_IN_REPO``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token, is_offline_mode

    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    check_run_dir(run_dir)
    for spec in include or []:
        parse_include(spec)
    token = get_token()
    if not token:
        raise UserError(f"push: no Hugging Face token found (looked in HF_TOKEN and the login cache). Allowed: a token with "
                        f"write access. Fix: run hf auth login, or export HF_TOKEN=... (a write token from "
                        f"https://huggingface.co/settings/tokens), then python -m mi_tune.push {run_dir} --repo-id {repo_id}. Nothing "
                        f"was deleted locally: {run_dir} is unchanged.")
    if is_offline_mode():
        raise UserError(OFFLINE_MESSAGE + f" Nothing was deleted locally: {run_dir} is unchanged.")
    plan = plan_push(run_dir, repo_id, base_model, license, token=token, include=include)  # redacts the token too
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
           for p, src in plan.files.items()]
    api = HfApi(token=token)
    log(f"push: {len(ops)} files from {run_dir} to {repo_id}")
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, ops, commit_message=commit_message or f"Upload mi_tune run {run_dir.name}",
                                 revision=revision, repo_type="model")
    except Exception as exc:  # every failure becomes one clear paragraph; the run folder is never touched
        raise hub_error(exc, repo_id, run_dir, token) from None
    # create_commit marks each file with the oid the Hub already had; equal oids were skipped (not re-uploaded)
    unchanged = [op.path_in_repo for op in ops
                 if getattr(op, "_remote_oid", None) is not None and op._remote_oid == getattr(op, "_local_oid", None)]
    if len(unchanged) == len(ops):
        log(f"push: {repo_id} already holds these {len(ops)} files; no new commit")
    else:
        log(f"push: {len(ops) - len(unchanged)} new or changed files, {len(unchanged)} unchanged")
    log(f"push: {info.commit_url}")
    return PushResult(plan, str(repo_url), info.commit_url, info.oid, unchanged)
