"""python -m mi_tune.compare [--experiment NAME] [--runs ID ...] [--metric NAME ...] [--tracking-uri URI]

Compare training runs tracked in MLflow: a table (the params that differ between the runs, then
their final metrics, sorted by the first --metric) and overlay plots written as PNG to --out and
logged to a comparison run (tag mi_tune.kind=comparison, the table as its description):

  training_curves.png   per-step training and eval metrics of every run
  layer_curves.png      recoverability accuracy (probe_*, step = layer) over normalized depth, a panel per
                        evaluation set (at most 4), a line per run, the base model dashed
  downstream.png        downstream_* metrics as grouped bars

Works on the embedded store (the default: ./mlruns.db) and on a server (--tracking-uri or
$MLFLOW_TRACKING_URI). Child runs (evaluations attached with mlflow.parentRunId) are folded into
their parent's row.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import plots
from .errors import UserError, cli_main

# Table columns when no --metric is given (those present in at least one run), best first.
DEFAULT_METRICS = ["heldout_enhanced_recoverability_acc", "heldout_base_recoverability_acc", "heldout_delta_acc", "heldout_delta_acc_low",
                   "heldout_delta_acc_high", "heldout_enhanced_mi_lb_bits",
                   "eval_recoverability_acc", "eval_loss", "train_loss", "train_runtime"]
CURVE_METRICS = ["loss", "recoverability_acc", "eval_loss", "eval_recoverability_acc"]
PROBE_PREFIX, DOWNSTREAM_PREFIX = "probe_", "downstream_"
PROBE_CURVE, PROBE_VARIANTS = "_recoverability_acc", ("base", "adapter")  # layer_curves.png: probe_[<variant>_]<set>_recoverability_acc
MAX_LAYER_PANELS = 4  # evaluation sets drawn in layer_curves.png; the other probe metrics stay in the table and MLflow
IGNORED_PARAMS = {"run_name", "overwrite"}  # the run name is its own column; overwrite says nothing about results
LOWER_IS_BETTER = re.compile(r"(loss|runtime|error|perplexity)", re.I)
MAX_METRIC_COLUMNS = 12
COMPARISON_TAG = "mi_tune.kind"


@dataclass
class RunView:
    run_id: str
    name: str
    status: str
    experiment_id: str
    params: dict
    metrics: dict  # final (latest) value of each metric, children folded in
    sources: dict = field(default_factory=dict)  # metric -> run id that holds its history (self or a child)


# ---------------------------------------------------------------------------------------------
# selecting runs


def open_client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from .mlflow_store import check_reachable, default_uri, quiet_mlflow
    from .redaction import strip_userinfo

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"--tracking-uri: no MLflow store at {uri}. Allowed: the store your runs went to (default: mlruns.db in "
                        f"the folder you trained from), or a server. Fix: run from that folder, or pass --tracking-uri "
                        f"sqlite:///path/to/mlruns.db or http://host:5000.")
    check_reachable(uri)
    quiet_mlflow(uri)
    return MlflowClient(tracking_uri=uri), strip_userinfo(uri)


def select_runs(client, experiment: str | None, run_ids: list[str] | None, max_runs: int) -> list[RunView]:
    """The chosen runs (``run_ids``) or every run of ``experiment`` except comparisons; children folded in."""
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except Exception:
                raise UserError(f"--runs: run {rid!r} is not in this store. Allowed: run ids of this store (see the MLflow UI or "
                                f"`mlflow runs list --experiment-id ID`). Fix: check the id and --tracking-uri.") from None
        exp_ids = sorted({r.info.experiment_id for r in runs})
    else:
        name = experiment or "mi_tune"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise UserError(f"--experiment: {name!r} is not in this store. Allowed: {', '.join(repr(n) for n in names) or 'none yet'}. "
                            f"Fix: pass one of those, or train with tracking on first.")
        exp_ids = [exp.experiment_id]
        runs = client.search_runs(exp_ids, max_results=5000, order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if r.data.tags.get(COMPARISON_TAG) != "comparison"]
    # Evaluations attached as child runs (tag mlflow.parentRunId) add their metrics to the parent's row.
    children = client.search_runs(exp_ids, max_results=5000) if run_ids else runs
    if not run_ids:
        runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][:max_runs]
    parents = {r.info.run_id: r for r in runs}
    views = {rid: RunView(rid, r.info.run_name or rid[:8], r.info.status, r.info.experiment_id, dict(r.data.params),
                          dict(r.data.metrics), {k: rid for k in r.data.metrics}) for rid, r in parents.items()}
    for c in children:
        parent = c.data.tags.get("mlflow.parentRunId")
        if parent in views and c.info.run_id not in views:
            v = views[parent]
            for k, val in c.data.metrics.items():
                if k not in v.metrics:  # the parent's own value wins
                    v.metrics[k] = val
                    v.sources[k] = c.info.run_id
    if not views:
        raise UserError(f"compare: no runs to compare in experiment(s) {', '.join(exp_ids)}. Allowed: finished or running training "
                        f"runs. Fix: train with tracking on, or pass --runs ID ID.")
    return list(views.values())


# ---------------------------------------------------------------------------------------------
# the table


def _num(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def differing_params(runs: list[RunView]) -> list[str]:
    """Params whose values differ between runs; a param missing from a run that logged others counts as a
    difference (the recipe schema changed), a run that logged no params at all (it died early) does not."""
    logged = [r for r in runs if r.params]
    keys = sorted({k for r in logged for k in r.params} - IGNORED_PARAMS)
    return [k for k in keys if len({_num(r.params.get(k)) for r in logged}) > 1]


def choose_metrics(runs: list[RunView], requested: list[str] | None) -> list[str]:
    present = {k for r in runs for k in r.metrics}
    if requested:
        missing = [m for m in requested if m not in present]
        if missing:
            close = sorted(present)
            raise UserError(f"--metric: {', '.join(missing)} not logged by any chosen run. Allowed: {', '.join(close[:40])}"
                            f"{' ...' if len(close) > 40 else ''}. Fix: pick one of those names.")
        return list(requested)
    chosen = [m for m in DEFAULT_METRICS if m in present]
    chosen += sorted(m for m in present if m.startswith(DOWNSTREAM_PREFIX))
    return chosen or sorted(m for m in present if not m.startswith(PROBE_PREFIX))[:MAX_METRIC_COLUMNS]


def higher_is_better(metric: str) -> bool:
    return not LOWER_IS_BETTER.search(metric)


def sort_runs(runs: list[RunView], metric: str, ascending: bool | None) -> tuple[list[RunView], bool]:
    asc = (not higher_is_better(metric)) if ascending is None else ascending
    have = [r for r in runs if metric in r.metrics]
    have.sort(key=lambda r: r.metrics[metric], reverse=not asc)
    return have + [r for r in runs if metric not in r.metrics], asc


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def table_rows(runs: list[RunView], params: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["#", "run", "run_id", "status", *params, *metrics]
    rows = [[str(i + 1), r.name, r.run_id[:8], r.status, *[_fmt(r.params.get(p)) for p in params],
             *[_fmt(r.metrics.get(m)) for m in metrics]] for i, r in enumerate(runs)]
    return header, rows


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the plots


def _history(client, run: RunView, key: str) -> tuple[list[int], list[float]]:
    hist = sorted(client.get_metric_history(run.sources.get(key, run.run_id), key), key=lambda m: (m.step, m.timestamp))
    last = {}
    for m in hist:  # one point per step: the latest value (a resumed run may log a step twice)
        last[m.step] = m.value
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def plot_training_curves(client, runs: list[RunView], extra: list[str], path: Path) -> Path | None:
    """A panel per per-step metric (training, eval, ``extra``) that some run logged at two steps or more; None: none did."""
    keys = [k for k in dict.fromkeys(CURVE_METRICS + extra) if not k.startswith((PROBE_PREFIX, DOWNSTREAM_PREFIX))
            and any(k in r.metrics for r in runs)]
    series = {k: {r.run_id: _history(client, r, k) for r in runs if k in r.metrics} for k in keys}
    series = {k: v for k, v in series.items() if any(len(s[0]) > 1 for s in v.values())}
    if not series:
        return None
    return plots.training_curves({k: [(r.name, *per_run[r.run_id]) for r in runs if r.run_id in per_run] for k, per_run in series.items()},
                                 path)


def probe_accuracy_curves(runs: list[RunView]) -> dict[str, list[tuple[RunView, str | None, str]]]:
    """The curves of ``layer_curves.png``: recoverability accuracy by evaluation set, ``{set: [(run, variant, metric)]}``.

    Probe curves are metrics ``probe_<variant>_<set>_<metric>`` (variant ``base`` or ``adapter``: the probe's
    child run) or ``probe_<set>_<metric>`` (``metrics.json``'s probe section, ``reopen_run``). Only
    ``<metric> = recoverability_acc`` is drawn, for the MAX_LAYER_PANELS sets that most runs have; every other
    probe metric stays in the table (``--metric``) and in MLflow.
    """
    panels: dict[str, list] = {}
    for r in runs:
        for key in sorted(r.metrics):
            if not (key.startswith(PROBE_PREFIX) and key.endswith(PROBE_CURVE)):
                continue
            name = key[len(PROBE_PREFIX):len(key) - len(PROBE_CURVE)]
            variant, _, rest = name.partition("_")
            if variant not in PROBE_VARIANTS or not rest:
                variant, rest = None, name
            panels.setdefault(rest or "all", []).append((r, variant, key))
    ranked = sorted(panels, key=lambda s: (-len({r.run_id for r, _, _ in panels[s]}), s))
    return {s: panels[s] for s in ranked[:MAX_LAYER_PANELS]}


def plot_layer_curves(client, runs: list[RunView], path: Path) -> Path | None:
    """A panel per evaluation set (``probe_accuracy_curves``): recoverability accuracy over normalized depth
    l / L (L = the run's ``resolved.num_blocks`` param, else its deepest probed layer): a solid line in its own
    colour per run (base + adapter), the base model dashed in grey (once when runs share its curve)."""
    series = {s: [(r, v, _history(client, r, k)) for r, v, k in lines] for s, lines in probe_accuracy_curves(runs).items()}
    series = {s: lines for s, lines in series.items() if any(len(h[0]) > 1 for _, _, h in lines)}
    if not series:
        return None
    color = {r.run_id: f"C{i % 10}" for i, r in enumerate(runs)}

    def curve(r: RunView, variant: str | None, steps: list[int], values: list[float]) -> plots.Curve:
        depth = float(r.params.get("resolved.num_blocks") or max(steps) or 1)
        xs = [s / depth for s in steps]
        if variant != "base":
            return r.name, xs, values, color[r.run_id]
        source = r.params.get("model.source")
        return (f"base: {Path(source.rstrip('/')).name}" if source else "base model"), xs, values, None

    return plots.layer_curves({s: [curve(r, v, *h) for r, v, h in lines] for s, lines in series.items()}, path)


def plot_downstream(runs: list[RunView], path: Path) -> Path | None:
    """The final downstream_* metrics of every run as grouped bars; None: no run has one."""
    keys = sorted({k for r in runs for k in r.metrics if k.startswith(DOWNSTREAM_PREFIX)})
    if not keys:
        return None
    return plots.downstream_bars([k[len(DOWNSTREAM_PREFIX):] for k in keys], [(r.name, [r.metrics.get(k, math.nan) for k in keys]) for r in runs],
                                 path)


# ---------------------------------------------------------------------------------------------
# the CLI


def compare(client, uri: str, experiment: str | None = None, run_ids: list[str] | None = None, metrics: list[str] | None = None,
            ascending: bool | None = None, out: Path | None = None, log: bool = True, max_runs: int = 50) -> dict:
    """Select, tabulate, plot and (optionally) log. Returns what was produced (for tests and notebooks)."""
    runs = select_runs(client, experiment, run_ids, max_runs)
    params = differing_params(runs)
    cols = choose_metrics(runs, metrics)
    key = cols[0] if cols else None
    if key:
        runs, ascending = sort_runs(runs, key, ascending)
    shown = cols[:MAX_METRIC_COLUMNS] if not metrics else cols
    header, rows = table_rows(runs, params, shown)
    text = render_text(header, rows)
    where = f"experiment {experiment or 'mi_tune'!r}" if not run_ids else f"{len(run_ids)} chosen run(s)"
    order = f"sorted by {key} ({'lower' if ascending else 'higher'} is better)" if key else "no metrics logged"
    print(f"{len(runs)} run(s) from {where} at {uri}, {order}")
    print(text)
    if len(cols) > len(shown):
        print(f"({len(cols) - len(shown)} more metric(s) not shown; choose with --metric NAME ...)")
    if not params:
        print("(all params are the same in these runs)")

    out = Path(out) if out else Path("outputs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(render_markdown(header, rows) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "run_id", "status", *params, *cols])
        for r in runs:
            w.writerow([r.name, r.run_id, r.status, *[r.params.get(p, "") for p in params], *[r.metrics.get(m, "") for m in cols]])
    plots = [p for p in (plot_training_curves(client, runs, [m for m in cols if m in CURVE_METRICS or (metrics and m in metrics)],
                                              out / "training_curves.png"),
                         plot_layer_curves(client, runs, out / "layer_curves.png"),
                         plot_downstream(runs, out / "downstream.png")) if p is not None]
    for p in plots:
        print(f"wrote {p}")
    logged = None
    if log:
        logged = log_comparison(client, runs, out, render_markdown(header, rows), experiment)
        print(f"logged to MLflow as run {logged} (tag {COMPARISON_TAG}=comparison)")
    return {"runs": runs, "params": params, "metrics": cols, "table": text, "plots": plots, "out": out, "logged_run": logged}


def log_comparison(client, runs: list[RunView], out: Path, markdown: str, experiment: str | None) -> str:
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    exp = client.get_experiment_by_name(experiment) if experiment else None
    exp_id = exp.experiment_id if exp is not None else runs[0].experiment_id
    note = f"Comparison of {len(runs)} run(s) by `python -m mi_tune.compare`.\n\n{markdown}\n"
    run = client.create_run(exp_id, run_name=out.name, tags={COMPARISON_TAG: "comparison", MLFLOW_RUN_NOTE: note})
    ids = ",".join(r.run_id for r in runs)
    client.log_batch(run.info.run_id, params=[Param("compared_runs", ids[:6000]), Param("num_runs", str(len(runs)))])
    client.log_artifacts(run.info.run_id, str(out))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mi_tune.compare", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=None, help="compare the runs of this experiment (default: mi_tune)")
    p.add_argument("--runs", nargs="+", default=None, metavar="ID", help="compare exactly these run ids (any experiment)")
    p.add_argument("--metric", nargs="+", action="extend", default=None, metavar="NAME",
                   help="table columns; the first sorts the runs (default: held-out recoverability, eval metrics, downstream_*)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=None, help="lowest first")
    order.add_argument("--descending", dest="ascending", action="store_false", help="highest first")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here")
    p.add_argument("--out", default=None, help="folder for the PNGs and table (default: outputs/compare-<time>)")
    p.add_argument("--max-runs", type=int, default=50, help="with --experiment: the newest this many runs")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    a = p.parse_args(argv)
    client, uri = open_client(a.tracking_uri)
    compare(client, uri, a.experiment, a.runs, a.metric, a.ascending, a.out, not a.no_log, a.max_runs)


if __name__ == "__main__":
    main(sys.argv[1:])
