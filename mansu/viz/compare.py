"""Cross-run figures: fp vs NF4 accuracy bars (the PTQ gap at a glance), the CAD interval and
per-edge contributions, and the quadrant plot separating behavioural suppression from structural
erasure (x = forget-accuracy drop of the unlearned model in fp or NF4 from the fp base, y = CAD in the same
precision).

metrics.json is keyed by stage (base_fp, base_nf4, unlearned_fp, unlearned_nf4); each stage holds
per-split accuracy results ({"forget": {"accuracy", "ci_low", "ci_high", ...}, "retain": ...}), and
"ptq_gap": {"forget": {"gap", "ci_low", "ci_high"}} the paired gap. cad.json holds "after_fp" and
"after_nf4", each {"value", "ci_low", "ci_high", "per_edge": {"u->v": contribution}}.  These are the only
shapes read: `mansu.runs.store.read_metrics`/`read_cad` check them when a run is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go

from mansu.runs.store import CadFile, Metrics

STAGES = ("base_fp", "base_nf4", "unlearned_fp", "unlearned_nf4")


@dataclass(frozen=True)
class Acc:
    value: float
    low: float | None = None
    high: float | None = None


def accuracy(metrics: Metrics | None, stage: str, split: str) -> Acc | None:
    """Accuracy of `split` (forget/retain) at `stage` from metrics.json (`mansu.runs.store.Metrics`), with its
    interval when recorded; None when that stage or split has not been evaluated."""
    result = ((metrics or {}).get(stage) or {}).get(split)
    if not result:
        return None
    return Acc(float(result["accuracy"]), result.get("ci_low"), result.get("ci_high"))


def forget_drop(metrics: Metrics | None, which: str = "fp") -> float | None:
    """acc_forget(base fp) - acc_forget(unlearned, in fp or its NF4 twin)."""
    if which not in ("fp", "nf4"):
        raise ValueError(f"which must be 'fp' or 'nf4', got {which!r}")
    base, after = accuracy(metrics, "base_fp", "forget"), accuracy(metrics, f"unlearned_{which}", "forget")
    return None if base is None or after is None else base.value - after.value


def forgotten_fraction(metrics: Metrics | None, which: str = "fp") -> float | None:
    """The scorecard's forgetting: forget_drop / (acc_forget(base fp) - chance), the fraction of the base's
    above-chance accuracy removed (None without a base above chance)."""
    from mansu.scorecard import chance

    drop, base = forget_drop(metrics, which), accuracy(metrics, "base_fp", "forget")
    c = chance(dict(metrics or {}), "forget")[0]
    return None if drop is None or base is None or base.value - c <= 0 else drop / (base.value - c)


def ptq_gap(metrics: Metrics | None) -> float | None:
    """acc_forget(NF4(unlearned)) - acc_forget(unlearned) (the backend's paired value when recorded)."""
    recorded = ((metrics or {}).get("ptq_gap") or {}).get("forget")
    if recorded:
        return float(recorded["gap"])
    fp, nf4 = accuracy(metrics, "unlearned_fp", "forget"), accuracy(metrics, "unlearned_nf4", "forget")
    return None if fp is None or nf4 is None else nf4.value - fp.value


CAD_ESTIMATORS = {"pooled": "pooled", "per_fact": "per fact"}   # mansu.attribution.cad: the two estimators


def cad_value(cad: CadFile | None, which: str = "fp",
              estimator: str = "pooled") -> tuple[float, float | None, float | None] | None:
    """(CAD, low, high) after unlearning in `which` (fp/nf4) from cad.json (`mansu.runs.store.read_cad`), pooled or
    per fact (None for runs made before per-fact CAD), or None."""
    if which not in ("fp", "nf4"):
        raise ValueError(f"which must be 'fp' or 'nf4', got {which!r}")
    if estimator not in CAD_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(CAD_ESTIMATORS)}, got {estimator!r}")
    entry = cad.get(f"after_{which}") if isinstance(cad, dict) else None  # a page may hold an unchecked file
    if entry and estimator == "per_fact":
        entry = (entry.get("per_fact") or {}).get("cad")
    if not entry:
        return None
    return float(entry["value"]), entry.get("ci_low"), entry.get("ci_high")


def fp_nf4_bars(runs: dict[str, Metrics], *, title: str = "forget and retain accuracy, fp vs NF4") -> go.Figure:
    """Grouped bars per run label: forget fp, forget NF4, retain fp, retain NF4 (after unlearning)."""
    fig = go.Figure()
    series = (("forget", "unlearned_fp", "forget fp", "#1f77b4"), ("forget", "unlearned_nf4", "forget NF4", "#aec7e8"),
              ("retain", "unlearned_fp", "retain fp", "#2ca02c"), ("retain", "unlearned_nf4", "retain NF4", "#98df8a"))
    for split, stage, name, color in series:
        xs, ys, hi, lo = [], [], [], []
        for label, metrics in runs.items():
            acc = accuracy(metrics, stage, split)
            if acc is None:
                continue
            xs.append(label)
            ys.append(acc.value)
            hi.append((acc.high - acc.value) if acc.high is not None else 0.0)
            lo.append((acc.value - acc.low) if acc.low is not None else 0.0)
        fig.add_trace(go.Bar(x=xs, y=ys, name=name, marker_color=color,
                             error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo}))
    fig.update_layout(barmode="group", title=title, yaxis={"title": "accuracy", "range": [0, 1.05]}, height=400,
                      margin={"l": 50, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return fig


# label positions tried in turn, so that labels of nearby points do not print over each other
_POSITIONS = ("top center", "bottom center", "middle right", "middle left", "top right", "bottom left",
              "top left", "bottom right")


def label_positions(xs: list[float], ys: list[float], span_x: float, span_y: float) -> list[str]:
    """A textposition per point: each point takes the first position not used by an earlier point whose label box
    could overlap (closer than a fifth of the x axis' span and a twelfth of the y axis'), so clustered runs get their
    labels above, below and beside each other."""
    out: list[str] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        taken = {out[j] for j in range(i) if abs(xs[j] - x) < span_x / 5 and abs(ys[j] - y) < span_y / 12}
        out.append(next((p for p in _POSITIONS if p not in taken), _POSITIONS[i % len(_POSITIONS)]))
    return out


def quadrant_figure(points: dict[str, tuple[float, float]], *, drop_margin: float = 0.1,
                    cad_threshold: float = 0.3, which: str = "nf4") -> go.Figure:
    """Runs as points (forgotten fraction, CAD), both in `which` (nf4: the deployed model; fp: full precision);
    dashed lines at the scorecard's forget margin (a fraction of the base's above-chance accuracy) and CAD
    threshold."""
    if which not in ("fp", "nf4"):
        raise ValueError(f"which must be 'fp' or 'nf4', got {which!r}")
    name = "NF4" if which == "nf4" else "fp"
    labels = list(points)
    xs = [points[k][0] for k in labels]
    ys = [points[k][1] for k in labels]
    x_lo, x_hi = min([0.0, *xs]) - 0.05, max([drop_margin * 2, *xs]) * 1.15
    y_lo, y_hi = min([0.0, *ys]) - 0.05, max([cad_threshold * 2, *ys]) * 1.15
    positions = label_positions(xs, ys, x_hi - x_lo, y_hi - y_lo)
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers+text", text=labels, textposition=positions,
                               marker={"size": 12, "color": "#ff7f0e"}, name="runs", cliponaxis=False,
                               hovertemplate="%{text}<br>forgotten %{x:.3g}<br>CAD %{y:.3g}<extra></extra>"))
    fig.add_vline(x=drop_margin, line={"dash": "dash", "color": "grey"})
    fig.add_hline(y=cad_threshold, line={"dash": "dash", "color": "grey"})
    # quadrant names in the plot's corners (paper coordinates), away from the points' labels
    corners = ((1, 1, "right", "top", "structural erasure"), (1, 0, "right", "bottom", "behavioural suppression"),
               (0, 1, "left", "top", "circuit changed, output kept"), (0, 0, "left", "bottom", "no effect"))
    for x, y, xanchor, yanchor, text in corners:
        fig.add_annotation(x=x, y=y, xref="paper", yref="paper", xanchor=xanchor, yanchor=yanchor, text=text,
                           showarrow=False, font={"color": "grey"})
    fig.update_layout(title=f"behavioural suppression vs structural erasure ({name})", height=420,
                      xaxis={"title": f"fraction of (base fp − chance) forgotten by unlearned {name}",
                             "range": [x_lo, x_hi]},
                      yaxis={"title": f"CAD after {name}", "range": [y_lo, y_hi]},
                      margin={"l": 50, "r": 30, "t": 50, "b": 40})
    return fig


def cad_figure(cad: CadFile | None, *, top: int = 20, which: str = "nf4") -> go.Figure:
    """CAD fp and NF4, pooled and per fact, with intervals (left) and the top per-edge contributions of `which`
    (right)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.3, 0.7],
                        subplot_titles=("CAD with 95% interval", f"top {top} per-edge contributions (after {which})"))
    for estimator, label in CAD_ESTIMATORS.items():
        for stage in ("fp", "nf4"):
            value = cad_value(cad, stage, estimator)
            if value is None:
                continue
            v, lo, hi = value
            err = (None if lo is None or hi is None
                   else {"type": "data", "symmetric": False, "array": [hi - v], "arrayminus": [v - lo]})
            fig.add_trace(go.Bar(x=[f"{stage} {label}"], y=[v], error_y=err, name=f"CAD {stage} {label}",
                                 marker_color="#1f77b4" if estimator == "pooled" else "#ff7f0e", showlegend=False),
                          1, 1)
    contribs = edge_contributions(cad, which)[:top]
    fig.add_trace(go.Bar(y=[c[0] for c in contribs][::-1], x=[c[1] for c in contribs][::-1], orientation="h",
                         marker_color="#9467bd", showlegend=False, name="contribution"), 1, 2)
    fig.update_layout(height=max(360, 22 * len(contribs) + 80), margin={"l": 50, "r": 10, "t": 50, "b": 40})
    return fig


def edge_contributions(cad: CadFile | None, which: str = "nf4") -> list[tuple[str, float]]:
    """Per-edge CAD contributions ('u->v', value) after unlearning in `which` (nf4/fp), by |value| descending."""
    entry = (cad.get(f"after_{which}") if isinstance(cad, dict) else None) or {}
    return sorted(((str(k), float(v)) for k, v in entry.get("per_edge", {}).items()), key=lambda r: -abs(r[1]))
