"""The MLflow model flavour of an adapter, its name in the model registry, and the tags of a training run.

At the end of a tracked training the run gets an artifact folder ``model/``, an MLflow pyfunc model whose
loader is this module and whose data is the adapter folder::

    model/
      MLmodel, requirements.txt, ...
      data/adapter/          PEFT files + head/ + recipe.yaml (+ run_info.json, README.md)

It is registered as a version of ``<base model name>-<method>`` (``registered_model_name``); each version is
tagged with its run name, base model, layer, pooling and held-out scores, and its description says how to
load it. ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` gives an ``AdapterEmbedder``: texts in,
enhanced sentence embeddings out.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

from . import __version__
from .errors import log
from .run_files import shareable

MODEL_ARTIFACT = "model"  # artifact folder of the MLflow model (the registered model version's source)
MODEL_DATA = "adapter"  # inside it: data/adapter/, a plain PEFT adapter folder (+ head/, recipe.yaml)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "head", "recipe.yaml", "run_info.json", "README.md")
ADAPTER_ONLY = {"adapter_config.json", "adapter_model.safetensors", "head"}  # uploaded once, inside model/


def method_name(recipe) -> str:
    """What a run trains: ``lora-recoverability``, or ``lora-lm-control`` for the LM-only control (no recoverability weight)."""
    return "lora-recoverability" if recipe.objective.recoverability_weight > 0 else "lora-lm-control"


def git_commit() -> str | None:
    """The commit of this mi_tune checkout, when git can tell."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_tags(recipe) -> dict:
    """The MLflow tags of a training run (``mi_tune.*``)."""
    return {"mi_tune.base_model": recipe.model.source, "mi_tune.method": method_name(recipe), "mi_tune.version": __version__,
            "mi_tune.git_commit": git_commit(), "mi_tune.run_dir": str(recipe.run_dir.resolve())}


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
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}-{method_name(recipe)}").strip("-")


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


def register_model_version(client, run_id: str, run_dir: Path, name: str, model_config: dict) -> None:
    """Log ``run_dir``'s adapter as the MLflow model ``model/`` of run ``run_id`` and register it as a version of ``name``."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="mi_tune_model_") as tmp:
        model_dir, meta = build_mlflow_model(run_dir, Path(tmp) / MODEL_ARTIFACT, model_config)
        with shareable(model_dir) as clean:
            client.log_artifacts(run_id, str(clean), MODEL_ARTIFACT)
    try:
        client.create_registered_model(name, description="LoRA adapters + bag-of-tokens heads trained by mi_tune "
                                                          "(token recoverability). Load: see each version's description.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    tags = {"mi_tune.run_name": run_dir.name, "mi_tune.base_model": meta["base_model"], "mi_tune.layer": meta["layer"],
            "mi_tune.pooling": meta["pooling"], **{k: v for k, v in meta.get("scores", {}).items()}}
    mv = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                     description=load_snippet(name, None))
    client.update_model_version(name, mv.version, description=load_snippet(name, mv.version))
    client.set_tag(run_id, "mi_tune.registered_model", f"models:/{name}/{mv.version}")
    log(f"tracking: adapter registered as models:/{name}/{mv.version}")


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
