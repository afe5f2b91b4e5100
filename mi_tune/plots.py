"""Every figure mi_tune writes, as PNG on matplotlib's Agg backend (files only, no display):

- probe (``mi_tune.eval.probe``): a figure per metric over normalized depth, base vs base + adapter, and
  ``claims_curves.png`` (encoders vs decoders, ``mi_tune.eval.claims``);
- downstream (``mi_tune.eval.downstream``): ``chart.png``, main metric per task and the change vs base;
- comparison (``mi_tune.compare``): training curves, recoverability by layer (a handful of panels) and downstream bars.

The functions take plain numbers (rows, dicts, lists); reading them from files or MLflow is the caller's job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

DEPTH_LABEL = "normalized depth l / L  (0 = embeddings, 1 = last block)"

Curve = tuple[str, list[float], list[float], str | None]  # (label, x, y, colour); colour None: a base model, dashed grey


# ---------------------------------------------------------------------------------------------
# shared figure setup, axes and saving


def _figure(rows: int, cols: int, figsize: tuple[float, float], **kw):
    """``(fig, axes)`` on the Agg backend; axes is always a rows x cols array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=figsize, squeeze=False, **kw)


def _grid(n: int):
    """n panels, two per row (the unused cell of an odd count hidden): ``(fig, [axes])``."""
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = _figure(rows, cols, (6.5 * cols, 4 * rows))
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path, dpi: int = 110, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay the figure out (inside ``rect``, figure fractions, when a legend sits below), write it and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _depth_axis(ax, label: str = DEPTH_LABEL) -> None:
    """x axis of a by-layer panel: normalized depth l / L from 0 to 1."""
    ax.set_xlabel(label, fontsize=8.5)
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def _legend_below(fig, handles: list, labels: list[str], fontsize: float) -> None:
    """One legend for all panels, centred under them, four entries a row."""
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=fontsize, frameon=False)


def _bars(ax, x, series: list[tuple[str, Sequence[float], dict]]) -> None:
    """Grouped bars: at each x, one bar per ``(label, values, bar keywords)`` series, side by side within 0.8."""
    width = 0.8 / len(series)
    for i, (label, values, style) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, **style)


# ---------------------------------------------------------------------------------------------
# probe


def _probe_curve(rows: list[dict], model: str, variant: str, set_name: str) -> list[dict]:
    """The rows of one line: a model variant on one set, by layer."""
    return sorted((r for r in rows if r["model"] == model and r["variant"] == variant and r["set"] == set_name), key=lambda r: r["layer"])


def _file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def probe_metrics(out_dir: Path, rows: list[dict], set_names: list[str], title: str, labels: dict[str, str]) -> list[Path]:
    """plots/<metric>.png for each metric of ``labels`` (key -> axis label): a panel per data set, metric over
    normalized depth l/L, one line per model (base solid, + adapter dashed), the no-feature prior dotted."""
    lines = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    paths = []
    for key, ylabel in labels.items():
        fig, axes = _figure(1, len(set_names), (4.3 * len(set_names), 4.4), sharey=True)
        for ax, s in zip(axes[0], set_names):
            role = next(r["role"] for r in rows if r["set"] == s)
            for i, (model, variant) in enumerate(lines):
                rs = _probe_curve(rows, model, variant, s)
                label = model if variant == "base" else f"{model} + adapter"
                ax.plot([r["depth"] for r in rs], [r[key] for r in rs], marker="o", markersize=3, linewidth=1.6,
                        linestyle="-" if variant == "base" else "--", color=f"C{i}", label=label)
                if key == "recoverability_acc" and variant == "base" and rs:
                    ax.axhline(rs[0]["prior_acc"], color=f"C{i}", linestyle=":", linewidth=1.2,
                               label=f"{model}: no-feature prior (training frequency)")
            ax.set_title(f"{s} ({'train, in-sample' if role == 'train' else 'evaluation'})", fontsize=10)
            _depth_axis(ax)
        axes[0][0].set_ylabel(ylabel, fontsize=8.5)
        handles, names = axes[0][0].get_legend_handles_labels()
        _legend_below(fig, handles, names, 8.5)
        fig.suptitle(f"{ylabel.split(' (')[0]} by layer — {title}", fontsize=11)
        paths.append(_save(fig, out_dir / "plots" / f"{key}.png", rect=(0, 0.07 * (1 + (len(names) - 1) // 4), 1, 1)))
    return paths


def learning_curve_figure(out_dir: Path, curve: list[dict]) -> Path:
    """plots/learning_curve.png: accuracy (mean over evaluation sets) vs training sentences at the last layer, a line per model."""
    fig, axes = _figure(1, 1, (6.5, 4.4))
    ax = axes[0][0]
    for i, model in enumerate(dict.fromkeys(r["model"] for r in curve)):
        rs = [r for r in curve if r["model"] == model]
        last = max(r["layer"] for r in rs)
        ns = sorted({r["n_train"] for r in rs})
        acc = [sum(r["recoverability_acc"] for r in rs if r["n_train"] == n and r["layer"] == last)
               / sum(1 for r in rs if r["n_train"] == n and r["layer"] == last) for n in ns]
        ax.plot(ns, acc, marker="o", markersize=3, linewidth=1.6, color=f"C{i}", label=f"{model} (layer {last})",
                linestyle="-" if rs[0]["kind"] == "encoder" else "--")
    ax.set_xscale("log")
    ax.set_xlabel("training sentences of the decoder", fontsize=8.5)
    ax.set_ylabel("recoverability accuracy, last layer\n(mean over evaluation sets)", fontsize=8.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    return _save(fig, out_dir / "plots" / "learning_curve.png")


def probe_adapter(out_dir: Path, rows: list[dict], model: str, set_names: list[str], labels: dict[str, str]) -> Path:
    """Before/after: base vs base + adapter on one figure (accuracy and the CE gain over the prior), a column per set."""
    keys = ["recoverability_acc", "ce_gain_over_prior_bits"]
    fig, axes = _figure(len(keys), len(set_names), (4.3 * len(set_names), 3.4 * len(keys)))
    for r_i, key in enumerate(keys):
        for c_i, s in enumerate(set_names):
            ax = axes[r_i][c_i]
            for variant, style, color in (("base", "--", "0.45"), ("adapter", "-", "C3")):
                rs = _probe_curve(rows, model, variant, s)
                ax.plot([r["depth"] for r in rs], [r[key] for r in rs], linestyle=style, color=color, marker="o", markersize=3,
                        label="base (before)" if variant == "base" else "base + adapter (after)")
            ax.set_title(s, fontsize=10)
            ax.grid(alpha=0.3)
            if r_i == len(keys) - 1:
                ax.set_xlabel("normalized depth l / L", fontsize=8.5)
            if c_i == 0:
                ax.set_ylabel(labels[key], fontsize=8)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{model}: before vs after the adapter", fontsize=11)
    return _save(fig, out_dir / "plots" / f"base_vs_adapter_{_file_slug(model)}.png")


def claims_figure(out_dir: Path, rows: list[dict]) -> Path:
    """plots/claims_curves.png, the evidence of the claims (``mi_tune.eval.claims``): every base model on the evaluation
    sets (mean over sets) over normalized depth, encoders solid, decoders dashed, a colour per model. Left: recoverability
    accuracy; right: selectivity (accuracy - control accuracy), or without the control task the gain over the prior."""
    import numpy as np

    base = [r for r in rows if r["variant"] == "base" and r["role"] == "eval"]
    control = bool(base) and all("selectivity" in r for r in base)
    right = (lambda r: r["selectivity"]) if control else (lambda r: r["recoverability_acc"] - r["prior_acc"])
    fig, axes = _figure(1, 2, (11, 4.4))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in base)):
        rs = [r for r in base if r["model"] == model]
        by_layer = [[r for r in rs if r["layer"] == layer] for layer in sorted({r["layer"] for r in rs})]  # each layer's eval sets
        style = {"color": f"C{i}", "linestyle": "-" if rs[0]["kind"] == "encoder" else "--", "marker": "o", "markersize": 3,
                 "linewidth": 1.6, "label": model if rs[0]["kind"] in model else f"{model} ({rs[0]['kind']})"}
        depth = [g[0]["depth"] for g in by_layer]
        axes[0][0].plot(depth, [np.mean([r["recoverability_acc"] for r in g]) for g in by_layer], **style)
        axes[0][1].plot(depth, [np.mean([right(r) for r in g]) for g in by_layer], **style)
    axes[0][0].set_ylabel("recoverability accuracy (precision@|bag|, 0-1)", fontsize=8.5)
    axes[0][1].set_ylabel("selectivity: accuracy − control accuracy" if control else "accuracy − no-feature prior accuracy", fontsize=8.5)
    axes[0][1].axhline(0, color="black", linewidth=0.8)
    for ax in axes[0]:
        _depth_axis(ax)
    handles, names = axes[0][0].get_legend_handles_labels()
    _legend_below(fig, handles, names, 8.5)
    fig.suptitle("encoders keep more and decline gently; decoders rise then forget? (base models, mean over evaluation sets)", fontsize=10.5)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    return _save(fig, out_dir / "plots" / "claims_curves.png", rect=(0, 0.07 * (1 + (len(names) - 1) // 4), 1, 1))


# ---------------------------------------------------------------------------------------------
# downstream


def downstream_chart(results: dict, path: Path) -> Path:
    """chart.png: each task's main metric per column, and (with more than one column) the deltas vs base with their
    paired bootstrap 95% intervals as error bars."""
    import numpy as np

    cols = [c["label"] for c in results["columns"]]
    tasks = list(results["tasks"])
    main = {t: results["tasks"][t]["main"] for t in tasks}
    names = [f"{t}\n{main[t]}" for t in tasks]
    x = np.arange(len(tasks))
    panels = 2 if len(cols) > 1 else 1
    fig, axes = _figure(1, panels, (max(6, 1.6 * len(tasks)) * panels, 4.5))
    ax = axes[0][0]
    _bars(ax, x, [(c, [results["tasks"][t]["scores"][c][main[t]] for t in tasks], {}) for c in cols])
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"{results['suite']}: main metric per task")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        series = []
        for i, c in enumerate(cols[1:]):
            vals = np.array([results["tasks"][t]["delta"][c][main[t]] for t in tasks])
            ci = [results["tasks"][t].get("interval", {}).get(c) for t in tasks]
            err = np.nan_to_num(np.array([[v - iv["low"], iv["high"] - v] if iv else [0.0, 0.0] for v, iv in zip(vals, ci)]).T.clip(0))  # (2, T)
            series.append((f"{c} − {cols[0]}", vals, {"yerr": err, "capsize": 2, "error_kw": {"linewidth": 0.8},
                                                       "color": f"C{i + 1}"}))  # same colour as on the left
        _bars(ax, x, series)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel("Δ vs " + cols[0])
        ax.set_title("change vs base (paired bootstrap 95% intervals)")
        ax.legend(fontsize=8)
    return _save(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------
# comparison of tracked runs


def training_curves(panels: dict[str, list[tuple[str, list[int], list[float]]]], path: Path) -> Path:
    """A panel per metric ``{metric: [(run name, steps, values)]}``, a line per run over training steps."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _grid(len(panels))
    for ax, (key, lines) in zip(axes, panels.items()):
        for name, steps, values in lines:
            ax.plot(steps, values, marker="o" if len(steps) < 15 else None, markersize=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("training curves")
    return _save(fig, path)


def layer_curves(panels: dict[str, list[Curve]], path: Path) -> Path:
    """A panel per evaluation set ``{set: [Curve]}``: recoverability accuracy over normalized depth, a solid line in
    its own colour per run, a base model dashed in grey (drawn once per panel when runs share its curve); one legend
    below the panels."""
    grey: dict[str, str] = {}  # base model -> its shade of grey (a base is not any one run's)
    fig, axes = _grid(len(panels))
    for ax, (set_name, curves) in zip(axes, panels.items()):
        drawn = set()
        for label, xs, values, color in curves:
            if color is not None:
                ax.plot(xs, values, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
            elif (tuple(xs), tuple(values)) not in drawn:  # runs of one base model share its curve: draw it once
                drawn.add((tuple(xs), tuple(values)))
                shade = grey.setdefault(label, f"{0.2 + 0.2 * (len(grey) % 3):.1f}")
                ax.plot(xs, values, color=shade, linestyle="--", marker="o", markersize=3, linewidth=1.5, label=label)
        ax.set_title(set_name, fontsize=10)
        _depth_axis(ax)
        ax.set_ylabel("recoverability accuracy", fontsize=8.5)
    legend = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    rows = (len(legend) + 3) // 4
    width, height = fig.get_size_inches()
    extra = 0.3 + 0.22 * rows  # inches below the panels for the legend
    fig.set_size_inches(width, height + extra)
    _legend_below(fig, list(legend.values()), list(legend), 8)
    fig.suptitle("recoverability accuracy by layer (probe): base + adapter solid, base dashed")
    return _save(fig, path, rect=(0, extra / (height + extra), 1, 1))


def downstream_bars(ticks: list[str], series: list[tuple[str, list[float]]], path: Path) -> Path:
    """Grouped bars: a group per downstream metric (``ticks``), a bar per ``(run name, values)``."""
    import numpy as np

    x = np.arange(len(ticks))
    fig, axes = _figure(1, 1, (max(6.0, 1.2 * len(ticks) + 2), 4.5))
    ax = axes[0][0]
    _bars(ax, x, [(name, values, {}) for name, values in series])
    ax.set_xticks(x, ticks, rotation=30, ha="right")
    ax.set_title("downstream results")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
