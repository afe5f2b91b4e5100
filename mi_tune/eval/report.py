"""Tables and printed summaries of the probe (probe.csv, probe.json, the summary on stdout) and of the downstream
evaluation (table.md, also printed). Formatting only: the numbers come from ``layer_metrics`` and the task families."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .. import check_report
from ..stats import Interval
from .layer_metrics import METRICS

COLUMNS = ["model", "variant", "kind", "pooling", "decoder", "layer", "num_blocks", "depth", "set", "role", "sentences",
           "text_metric_sentences", "vocab_size", "token_entropy_bits", *METRICS, "cross_entropy_bits", "prior_acc", "q_tilt",
           "ridge_lambda", "source", "adapter"]
CONTROL_COLUMNS = ["control_acc", "selectivity"]  # written only when the suite ran the control task
PER_SENTENCE = ("_acc", "_prior", "_control_acc")  # row keys holding per-sentence arrays (for the intervals); not written to the tables
COUNT_KEYS = ("n_train", "n_test", "n_classes", "n_pairs", "n_samples", "n_seeds", "n_queries", "n_docs", "full_corpus")  # task outputs that are sizes, not metrics


# ---------------------------------------------------------------------------------------------
# probe


def write_tables(out_dir: Path, rows: list[dict], setup: dict, summary: list[dict], deltas: list[dict] | None = None) -> None:
    """probe.csv (one row per model, variant, layer and set) and probe.json (setup, summary, adapter deltas, rows)."""
    with open(out_dir / "probe.csv", "w", newline="") as f:
        control = any("selectivity" in r for r in rows)
        w = csv.DictWriter(f, fieldnames=COLUMNS + (CONTROL_COLUMNS if control else []), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plain = [{k: v for k, v in r.items() if k not in PER_SENTENCE} for r in rows]
    (out_dir / "probe.json").write_text(json.dumps({"setup": setup, "summary": summary, "adapter_deltas": deltas or [], "rows": plain},
                                                   indent=1, default=str))


def _iv(d: dict) -> str:
    """``check_report.fmt_interval`` padded to one width whether or not the ``*`` is there (aligned columns)."""
    return check_report.fmt_interval(d) + ("" if d["excludes_zero"] else " ")


def print_summary(summary: list[dict], deltas: list[dict] | None = None) -> None:
    """The evaluation sets' accuracy at layer 0, the best and the last layer, with intervals; then adapter - base."""
    print("\nrecoverability accuracy on the evaluation sets (prior = no features: rank ids by training frequency); "
          "[..] = paired bootstrap 95% interval over sentences, * = excludes 0")
    print(f"{'model':<36} {'set':<20} {'prior':>7} {'layer 0':>8} {'best layer (l/L)':>17} {'best':>7} {'last':>7} "
          f"{'best - last [95% CI]':>28} {'last - prior [95% CI]':>28}")
    for s in summary:
        name = s["model"] if s["variant"] == "base" else f"{s['model']} + adapter"
        print(f"{name[-36:]:<36} {s['set'][:20]:<20} {s['prior_acc']:>7.4f} {s['first_acc']:>8.4f} {s['best_layer']:>6} ({s['best_depth']:.2f})"
              f"     {s['best_acc']:>7.4f} {s['last_acc']:>7.4f} {_iv(s['drop_interval']):>28} {_iv(s['last_over_prior']):>28}")
    if any("selectivity_best" in s for s in summary):
        print("\nselectivity = accuracy - control accuracy (the same decoder fitted to bags of other sentences; held out the "
              "control sits at the prior's level, in sample it shows what the decoder can memorise)")
        for s in summary:
            if "selectivity_best" in s:
                name = s["model"] if s["variant"] == "base" else f"{s['model']} + adapter"
                print(f"{name[-36:]:<36} {s['set'][:20]:<20} best layer {s['best_layer']:>3}: {_iv(s['selectivity_best'])}   "
                      f"last layer {s['last_layer']:>3}: {_iv(s['selectivity_last'])}   control, in sample (capacity): "
                      f"{s['control_train_acc_best']:.4f} / {s['control_train_acc_last']:.4f}")
    if deltas:
        print("\nbase + adapter - base (same sentences, same layer)")
        for d in deltas:
            print(f"{d['model'][-36:]:<36} {d['set'][:20]:<20} {d['at']} layer {d['layer']:>3}: {_iv(d)}")


def write_learning_curve(out_dir: Path, curve: list[dict], flat: list[dict]) -> Path:
    """learning_curve.csv (model, n_train, layer, set, accuracy, prior) and learning_curve.json (+ the last step's gain)."""
    cols = ["model", "kind", "pooling", "n_train", "layer", "depth", "set", "recoverability_acc", "prior_acc"]
    with open(out_dir / "learning_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(curve)
    (out_dir / "learning_curve.json").write_text(json.dumps({"last_step_gain": flat, "rows": [{k: r[k] for k in cols} for r in curve]},
                                                            indent=1, default=str))
    return out_dir / "learning_curve.csv"


def print_learning_curve(flat: list[dict]) -> None:
    """Per model: what the last doubling of the training sentences still adds (mean over evaluation sets)."""
    print("\nlearning curve: accuracy gained by the last step of training sentences (mean over evaluation sets; "
          "an interval that includes 0 = the curve has flattened at that layer)")
    for f in flat:
        print(f"{f['model'][-36:]:<36} {f['at']} layer {f['layer']:>3}: n {f['from_n']} -> {f['to_n']}: {_iv(f)}")


# ---------------------------------------------------------------------------------------------
# downstream


def metric_names(scores_by_col: dict) -> list[str]:
    """A task's metric names (the first column's score keys that are not sizes), in table order."""
    first = next(iter(scores_by_col.values()))
    return [k for k in first if k not in COUNT_KEYS]


def fmt_delta(d: float) -> str:
    return f"{d:+.4f}"


def fmt_interval(interval: dict | None, delta: float) -> str:
    """'+0.0123 [+0.0050, +0.0190]*' from an ``Interval.to_dict()`` (the * marks an interval that excludes 0); a plain Δ without one."""
    if not interval:
        return fmt_delta(delta)
    return Interval(**{k: interval[k] for k in ("estimate", "low", "high", "level", "resamples", "n")}).fmt()


def fmt_spread(s: dict) -> str:
    return f"{s['mean']:+.4f} ± {s['sd']:.4f}"


def render_table(results: dict) -> str:
    """Markdown table (also printed): one row per task metric; base, then each column with its delta; adapter − control
    and adapter − each training-free baseline. The main metric's deltas carry their paired bootstrap interval; with 2+
    adapters, their mean ± sd follows."""
    cols = results["columns"]
    base = cols[0]["label"]
    header = ["task", "metric", base]
    for c in cols[1:]:
        header += [c["label"], "Δ"]
    controls = [c["label"] for c in cols if c["role"] == "control"]
    adapters = [c["label"] for c in cols if c["role"] == "adapter"]
    baselines = [c["label"] for c in cols if c["role"] == "baseline"]
    versus = [(a, c) for c in controls[:1] for a in adapters] + [(a, b) for a in adapters for b in baselines]  # adapter − other
    header += [f"{a} − {b}" for a, b in versus]
    across = any("across_adapters" in t for t in results["tasks"].values())
    if across:
        header += ["Δ across adapters (seeds)"] + ([f"− {controls[0]} across adapters (seeds)"] if controls else [])
    rows = []
    for task, t in results["tasks"].items():
        for m in metric_names(t["scores"]):
            main = m == t["main"]
            row = [task, m + (" *" if main else ""), f"{t['scores'][base][m]:.4f}"]
            for c in cols[1:]:
                d = t["delta"][c["label"]][m]
                row += [f"{t['scores'][c['label']][m]:.4f}", fmt_interval(t.get("interval", {}).get(c["label"]), d) if main else fmt_delta(d)]
            for a, b in versus:
                d = t["scores"][a][m] - t["scores"][b][m]
                iv = t.get("interval_vs_control", {}).get(a) if b in controls else t.get("interval_vs_baselines", {}).get(a, {}).get(b)
                row.append(fmt_interval(iv, d) if main else fmt_delta(d))
            if across:
                spread = t.get("across_adapters") if main else None
                row += [fmt_spread(spread["delta"]) if spread else ""]
                if controls:
                    row += [fmt_spread(spread["vs_control"]) if spread else ""]
            rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    note = "\n\n* main metric of the task. Δ = column − " + base + ".\n"
    if baselines:
        note += (f"Training-free baselines: {', '.join(baselines)} = the base model without adapter at the same layer as every column, "
                 f"with its own pooling instead of {results.get('pooling')} (echo: each text fed twice, mean over the second copy). "
                 "adapter − baseline: did training beat the training-free alternative?\n")
    return "\n".join(out) + note + interval_note(results, across)


def interval_note(results: dict, across: bool) -> str:
    """Footnote: what the intervals next to the main metric's deltas are."""
    boot = {task: t["bootstrap"] for task, t in results["tasks"].items() if t.get("bootstrap")}
    if not boot:
        return ""
    b0 = next(iter(boot.values()))
    draws = "; ".join(f"{task}: {b['resamples']} draws of {b['n']} {b['items']}" for task, b in boot.items())
    note = (f"[low, high] after a main metric's difference: paired bootstrap {b0['level']:.0%} interval, percentile method (numpy, seed "
            f"{b0['seed']}): the task's items are drawn with replacement, the same draw for both sides, and the metric is recomputed "
            f"on each draw; a trailing * marks an interval that excludes 0. {draws}.\n")
    if across:
        note += "Across adapters (seeds): mean ± sample sd over the adapters (not the control) of the main metric's difference.\n"
    return note
