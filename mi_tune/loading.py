"""One call to get a model ready for probing / evaluation: base model, optional adapter (run folder
or Hub id), optional head. Training, probing and evaluation share this and ``embedding.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import UserError
from .head import HEAD_DIR, RecoverabilityHead
from .modeling import LoadedModel, default_pooling, load_model, log

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class ReadyModel:
    loaded: LoadedModel  # .model is a PeftModel when an adapter was given
    head: RecoverabilityHead | None
    adapter: str | None  # where the adapter came from (path or Hub id)
    run_recipe: dict | None  # the training recipe, when the adapter is an mi_tune run folder

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def default_layer_pooling(self) -> tuple[int, str]:
        """The head's layer and pooling when there is a head, else last layer + the kind's default."""
        if self.head is not None:
            return self.head.config.layer, self.head.config.pooling
        return self.loaded.num_blocks, default_pooling(self.loaded.kind)


def resolve_adapter(adapter: str, revision: str | None = None) -> Path:
    """A local run folder, or a Hub id fetched with ``snapshot_download`` (safetensors and JSON only)."""
    p = Path(adapter).expanduser()
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(adapter, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.yaml", "*.md", "*.png"]))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter: {adapter!r} is neither a local folder nor a reachable Hub repo ({first}). Allowed: a run folder "
                        f"(adapters/<run>) or a Hub id. Fix: check the path, the repo id, or your network and HF_TOKEN.") from None


def check_safe_files(folder: Path, allow_pickle: bool = False) -> None:
    """Weights we load from run folders and heads are safetensors only."""
    if allow_pickle:
        return
    if not (folder / "adapter_model.safetensors").exists():
        bad = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if bad:
            raise UserError(f"adapter: {folder} holds pickle-based weights ({', '.join(bad)}) and no adapter_model.safetensors. "
                            f"Allowed: safetensors (pickle files can run code when loaded). Fix: convert the adapter to safetensors, "
                            f"or pass --allow-pickle if you trust its source.")
        raise UserError(f"adapter: {folder} has no adapter_model.safetensors. Allowed: a PEFT adapter folder. Fix: point at adapters/<run>.")


def load_ready(model_cfg: ModelConfig | str | None = None, adapter: str | None = None, allow_pickle: bool = False,
               adapter_revision: str | None = None) -> ReadyModel:
    """Base model (+ adapter, + head). If only an adapter run folder is given, its recipe names the base model."""
    from peft import PeftModel

    folder = resolve_adapter(adapter, adapter_revision) if adapter else None
    recipe = None
    if folder is not None and (folder / "recipe.yaml").exists():
        import yaml

        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    if model_cfg is None:
        if recipe is None:
            raise UserError("model: no model given. Allowed: --model SOURCE, or an adapter run folder whose recipe.yaml names it. "
                            "Fix: pass --model.")
        model_cfg = ModelConfig(**recipe["model"])
    elif isinstance(model_cfg, str):
        base = dict(recipe["model"]) if recipe else {}
        base["source"] = model_cfg
        model_cfg = ModelConfig(**base)
    loaded = load_model(model_cfg)
    head = None
    if folder is not None:
        check_safe_files(folder, allow_pickle)
        loaded.model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=False)
        loaded.model.eval()
        if (folder / HEAD_DIR / "config.json").exists():
            head = RecoverabilityHead.from_pretrained(folder / HEAD_DIR, device=loaded.device)
            if head.config.num_hidden_states != loaded.num_hidden_states:
                raise UserError(f"adapter: the head in {folder} was trained on a model with {head.config.num_hidden_states} hidden "
                                f"states; {model_cfg.source!r} has {loaded.num_hidden_states}. Fix: use the base model named in "
                                f"{folder / HEAD_DIR / 'config.json'} ({head.config.base_model}).")
        log(f"adapter: {adapter}" + (f" (head: layer {head.config.layer}, {head.config.pooling} pooling)" if head else ""))
    loaded.model.eval()
    return ReadyModel(loaded, head, adapter, recipe)


def read_run_metrics(folder: str | Path) -> dict:
    p = Path(folder) / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}
