"""Figures and tables of the grid-alignment diagnostic (mansu.quant.diagnose) and of a run's PTQ gap per quantizer:
pure plotly / dict builders, no streamlit."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def _order(report: dict[str, Any]) -> list[str]:
    """The report's quantizers in the order they were asked for (metrics.json sorts object keys)."""
    quants = report.get("quantizers") or {}
    order = [q for q in report.get("order") or [] if q in quants]
    return order + [q for q in quants if q not in order]


def verdict_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per quantizer of a diagnose report: verdict, kept fraction k, mean distance, on-grid fraction, SNR."""
    rows = []
    for q in _order(report):
        o = report["quantizers"][q].get("overall") or {}
        verdict = {"undone": "undone", "kept": "kept in expectation"}.get(o.get("verdict"), "n/a")
        rows.append({"quantizer": q, "sub-bin forgetting": verdict, "kept fraction k": o.get("kept_fraction"),
                     "mean distance (bins)": o.get("mean_distance"), "on grid": o.get("frac_on_grid"),
                     "median SNR": o.get("snr_median"), "weights": o.get("n")})
    return rows


def kept_heatmap(report: dict[str, Any]) -> go.Figure:
    """Per weight (rows) and quantizer (columns): the kept fraction k of a sub-bin update (0: undone, 1: kept in
    expectation), hover with the distance to the grid and the predicted SNR; the 0.5 verdict line is the colour
    scale's midpoint."""
    quants = _order(report)
    names: list[str] = []
    for q in quants:
        names += [r["name"] for r in report["quantizers"][q]["layers"] if r["name"] not in names]
    z, text = [], []
    for name in names:
        row_z, row_t = [], []
        for q in quants:
            r = next((r for r in report["quantizers"][q]["layers"] if r["name"] == name), None)
            row_z.append(None if r is None else r.get("kept_fraction"))
            row_t.append("not quantized" if r is None else
                         f"k {r['kept_fraction']:.3f}<br>distance {r['mean_distance']:.3f} bins<br>"
                         f"on grid {r['frac_on_grid']:.3f}<br>fan-in {r['fan_in']}, SNR {r['snr']:.2f}")
        z.append(row_z)
        text.append(row_t)
    fig = go.Figure(go.Heatmap(z=z, x=quants, y=names, text=text, hoverinfo="text+x+y", zmin=0.0, zmax=1.0,
                               colorscale="RdBu", colorbar={"title": "kept k"}))
    fig.update_layout(title=f"kept fraction of a {report.get('ratio', 0.05):g}-bin update, per weight and quantizer "
                            "(red: undone, blue: kept)", yaxis={"autorange": "reversed"},
                      height=max(300, 18 * len(names) + 120), margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def ptq_gap_by_quantizer_figure(metrics: dict[str, Any], max_ptq_gap: float = 0.0) -> go.Figure | None:
    """The forget-set PTQ gap acc(q) - acc(fp) of a run per quantizer, with its paired 95% CI and the scorecard's
    threshold; None when the run has no per-quantizer gaps."""
    gaps = metrics.get("ptq_gap_by_quantizer") if isinstance(metrics, dict) else None
    if not isinstance(gaps, dict) or not gaps:
        return None
    qs = [q for q, g in gaps.items() if isinstance((g or {}).get("forget"), dict)]
    vals = [gaps[q]["forget"]["gap"] for q in qs]
    hi = [gaps[q]["forget"]["ci_high"] - v for q, v in zip(qs, vals)]
    lo = [v - gaps[q]["forget"]["ci_low"] for q, v in zip(qs, vals)]
    fig = go.Figure(go.Bar(x=qs, y=vals, error_y={"type": "data", "array": hi, "arrayminus": lo},
                           marker_color=["#c0392b" if v > max_ptq_gap else "#2e86c1" for v in vals]))
    fig.add_hline(y=max_ptq_gap, line_dash="dash", annotation_text="max PTQ gap")
    fig.update_layout(title="forget-set PTQ gap per quantizer (positive: forgotten answers come back)",
                      yaxis_title="acc(quantized) - acc(fp)", height=320, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig
