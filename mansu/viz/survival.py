"""Figures of the update's survival under NF4 (survival.json; schema in docs/nf4.md).

The histogram is of r_i = |delta_i| / bin_i, the update of each parameter in units of its NF4 bin
width; r >= 1 is where a code must change, so the x = 1.0 line is drawn. Counts are normalised to
fractions so runs of different sizes overlay.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

_LAYER_RE = re.compile(r"(?:layers?|h|blocks?)\.(\d+)\.")


@dataclass(frozen=True)
class Histogram:
    edges: np.ndarray    # [n_bins + 1] bin edges in units of the bin width (log-spaced)
    counts: np.ndarray   # [n_bins]


def _first(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if isinstance(d, dict) and d.get(key) is not None:
            return d[key]
    return None


def histogram_of(entry: dict[str, Any], edges: list[float] | None = None) -> Histogram | None:
    """The |delta|/bin histogram of one survival entry (overall, a layer or a tensor), or None.

    Accepts `{"edges", "counts"}` or bare counts with the report's shared `histogram_edges`; counts with
    two more entries than bins are [underflow, bins..., overflow] (mansu.quant.survival) and get one
    decade-wide bin on each side so nothing is hidden."""
    hist = _first(entry, "histogram", "hist", "ratio_histogram")
    if isinstance(hist, dict):
        edges, counts = _first(hist, "edges", "bin_edges"), _first(hist, "counts", "count")
    else:
        counts = hist
    if edges is None or not isinstance(counts, list):
        return None
    e, c = np.asarray(edges, dtype=float), np.asarray(counts, dtype=float)
    if c.size == e.size + 1 and e.size >= 2 and e[0] > 0:
        e = np.concatenate([[e[0] / 10], e, [e[-1] * 10]])
    if c.size != e.size - 1:
        return None
    return Histogram(e, c)


def median_ratio(entry: dict[str, Any]) -> float | None:
    """Median |delta|/bin of an entry."""
    value = _first(entry, "median_ratio", "median", "ratio_median")
    if value is None and isinstance(entry.get("quantiles"), dict):
        value = _first(entry["quantiles"], "0.5", "50", "p50", "median")
    return float(value) if value is not None else None


def code_change_fraction(entry: dict[str, Any]) -> float | None:
    """Fraction of updated weights whose NF4 code changed."""
    value = _first(entry, "frac_code_changed", "code_changed_fraction", "codes_changed_fraction",
                   "code_change_fraction", "fraction_code_changed")
    return float(value) if value is not None else None


def overall(survival: dict[str, Any]) -> dict[str, Any]:
    """The overall entry of a survival.json (the top level when there is no 'overall' key)."""
    return survival.get("overall") if isinstance(survival.get("overall"), dict) else survival


def _as_mapping(value: Any, key: str) -> dict[str, dict[str, Any]]:
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items() if isinstance(v, dict)}
    if isinstance(value, list):
        return {str(v.get(key, i)): v for i, v in enumerate(value) if isinstance(v, dict)}
    return {}


def per_layer(survival: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries keyed by layer label."""
    return _as_mapping(_first(survival, "per_layer", "layers"), "layer")


def shared_edges(survival: dict[str, Any]) -> list[float] | None:
    """The report-wide histogram edges, when histograms are stored as bare counts."""
    edges = survival.get("histogram_edges")
    return edges if isinstance(edges, list) else None


def per_tensor(survival: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries keyed by parameter name."""
    return _as_mapping(_first(survival, "per_tensor", "tensors"), "name")


def headline(survival: dict[str, Any]) -> str | None:
    """'the median update is N x below the NF4 bin width' (or 'X bin widths' at or above 0.5); the
    report's own headline when there is no median; None without either."""
    med = median_ratio(overall(survival))
    if med is None or not math.isfinite(med) or med <= 0:
        return survival.get("headline") if isinstance(survival.get("headline"), str) else None
    if med < 0.5:
        return f"the median update is {1 / med:,.0f}x below the NF4 bin width (median |delta|/bin = {med:.3g})"
    return f"the median update is {med:,.2f} NF4 bin widths (median |delta|/bin = {med:.3g})"


def histogram_figure(series: dict[str, Histogram], *, title: str = "|delta| / NF4 bin width") -> go.Figure:
    """Step histograms (fraction of updated parameters) on a log x axis, one line per series, x=1 marked."""
    fig = go.Figure()
    for label, hist in series.items():
        total = hist.counts.sum() or 1.0
        frac = hist.counts / total
        x = np.repeat(hist.edges, 2)[1:-1]
        y = np.repeat(frac, 2)
        positive = x > 0
        fig.add_trace(go.Scatter(x=x[positive], y=y[positive], mode="lines", name=label,
                                 line={"shape": "linear", "width": 2}))
    fig.add_vline(x=1.0, line={"color": "black", "dash": "dash"}, annotation_text="1 bin (code must change)",
                  annotation_position="top right")
    fig.update_layout(title=title, xaxis={"type": "log", "title": "|delta| / bin width"},
                      yaxis={"title": "fraction of updated parameters"}, height=400,
                      margin={"l": 50, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return fig


def layer_of(name: str) -> str:
    """The layer number in a parameter name ('model.layers.3.mlp...' -> '3'), else the name."""
    match = _LAYER_RE.search(name + ".")
    return match.group(1) if match else "other"


def code_change_matrix(rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, layer labels, fractions) from {row: {layer: entry}}; NaN where missing."""
    layers = sorted({k for entries in rows.values() for k in entries}, key=_natural_key)
    labels = list(rows)
    z = np.full((len(labels), len(layers)), np.nan)
    for i, label in enumerate(labels):
        for j, layer in enumerate(layers):
            entry = rows[label].get(layer)
            frac = code_change_fraction(entry) if isinstance(entry, dict) else None
            if frac is not None:
                z[i, j] = frac
    return labels, layers, z


def _natural_key(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (10**9, text)


def code_change_heatmap(rows: dict[str, dict[str, Any]], *, title: str = "fraction of NF4 codes changed") -> go.Figure:
    """Heatmap: rows (runs or tensor kinds) x layers, colour = fraction of updated weights whose code changed."""
    labels, layers, z = code_change_matrix(rows)
    text = [[("" if math.isnan(v) else f"{v:.1%}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=[f"layer {l}" if l.isdigit() else l for l in layers], y=labels,
                               colorscale="Viridis", zmin=0.0, zmax=1.0, text=text, texttemplate="%{text}",
                               colorbar={"title": {"text": "codes changed"}}))
    fig.update_layout(title=title, height=max(260, 60 + 40 * len(labels)), margin={"l": 120, "r": 10, "t": 50, "b": 40})
    return fig


def tensor_kind(name: str) -> str:
    """Short kind of a parameter name: q_proj, down_proj, ... (the module name before .weight)."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    return parts[-1] if parts else name


def by_kind_and_layer(tensors: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Regroup per-tensor entries into {kind: {layer: entry}} for the heatmap."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tensors.items():
        out.setdefault(tensor_kind(name), {})[layer_of(name)] = entry
    return out


def alignment_summary(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """metrics.json's `base_alignment` (mansu.quant.survival.alignment_report's overall record plus the
    setting), or None when the run did not record it."""
    entry = metrics.get("base_alignment") if isinstance(metrics, dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("histogram"), list) else None


def alignment_figure(series: dict[str, list[float]]) -> go.Figure:
    """How far base weights sit from their NF4 level, in bin widths (linear bins over [0, 1]); a base stored
    as dequantized NF4 piles up at 0, a natural fp32 base spreads over [0, ~0.6]."""
    fig = go.Figure()
    for label, counts in series.items():
        c = np.asarray(counts, dtype=float)
        edges = np.linspace(0.0, 1.0, c.size + 1)
        fig.add_trace(go.Scatter(x=np.repeat(edges, 2)[1:-1], y=np.repeat(c / (c.sum() or 1.0), 2), mode="lines",
                                 name=label))
    fig.update_layout(title="base alignment: distance of each weight to its NF4 level",
                      xaxis={"title": "|theta - level| / bin width", "range": [0, 1]},
                      yaxis={"title": "fraction of weights"}, height=320,
                      margin={"l": 50, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return fig
