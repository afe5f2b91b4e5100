"""How a held-out check reads: the markdown table printed after training and shown in the run README and the
Hub card (``card.py``). Pure formatting of the ``heldout_check`` dict that ``check.py`` computes; no torch."""

from __future__ import annotations

HELDOUT = "heldout"  # the in-domain held-out set's key in a check; every other set is out-of-domain


def fmt_interval(d: dict, digits: int = 4) -> str:
    """``+0.0123 [+0.0040, +0.0210]*``: estimate, 95% interval, ``*`` when it excludes 0."""
    s = f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"
    return s + ("*" if d["excludes_zero"] else "")


def check_table(check: dict) -> list[str]:
    """Markdown rows: one per (set, model), then the change with its interval. Shared by the console, run README and card."""
    rows = ["| set | model | prior acc | accuracy | accuracy gain over prior [95% CI] | CE gain over prior, bits/token [95% CI] "
            "| MI lower bound (bits) | paper's estimate (bits, not a bound) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in check["setup"]["sets"]:
        label = f"{name} (in-domain)" if name == HELDOUT else f"{name} (out-of-domain)"
        for model in ("base", "enhanced"):
            r = check[name][model]
            rows.append(f"| {label} | {model} | {r['prior_acc']:.4f} | {r['recoverability_acc']:.4f} | "
                        f"{fmt_interval(r['gain_over_prior'])} | {fmt_interval(r['ce_gain_interval'], 3)} | {r['mi_lb_bits']:.3f} | "
                        f"{r['mi_fano_uniform_bits']:.3f} |")
        rows.append(f"| {label} | **enhanced − base** | | **{fmt_interval(check[name]['delta_acc'])}** | | "
                    f"**{fmt_interval(check[name]['delta_ce_gain_bits'], 3)}** | | |")
    return rows
