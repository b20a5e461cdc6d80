"""Figures and rows of a run's relearning attacks (mansu.attack.relearn): recovery curves and the certificate's
recovered fractions.  Pure plotly / dict builders, no streamlit."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

COLOURS = {"relearn": "#c0392b", "relearn-unrelated": "#2e86c1", "quantize-relearn": "#8e44ad"}


def attack_curves_figure(attacks: dict[str, dict[str, Any]]) -> go.Figure | None:
    """Forget accuracy (solid, 95% CI on hover) and retain accuracy (dotted) over attack steps, one colour per attack,
    with the base's forget accuracy (dashed) the attacks recover towards; None without attacks."""
    if not attacks:
        return None
    fig = go.Figure()
    for kind, data in attacks.items():
        curve = data.get("curve") or []
        steps = [p["step"] for p in curve]
        colour = COLOURS.get(kind, "#555")
        label = f"{kind} ({data.get('precision', 'fp')})"
        hover = [f"step {p['step']}<br>forget {p['forget']:.3f} [{p['forget_ci'][0]:.3f}, {p['forget_ci'][1]:.3f}]"
                 + ("" if p.get("forget_held_out") is None else f"<br>held-out {p['forget_held_out']:.3f}")
                 for p in curve]
        fig.add_trace(go.Scatter(x=steps, y=[p["forget"] for p in curve], mode="lines+markers", name=f"forget: "
                                 f"{label}", line={"color": colour}, hovertext=hover, hoverinfo="text+name"))
        fig.add_trace(go.Scatter(x=steps, y=[p.get("retain") for p in curve], mode="lines", name=f"retain: {label}",
                                 line={"color": colour, "dash": "dot"}))
    base = _base_forget(attacks)
    if base is not None:
        fig.add_hline(y=base, line_dash="dash", line_color="#333", annotation_text="base forget accuracy (fp)")
    fig.update_layout(title="relearning attacks: forget accuracy over fine-tuning steps (up: forgetting comes back)",
                      xaxis_title="attack step", yaxis_title="accuracy", yaxis={"range": [0, 1.05]}, height=380,
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def _base_forget(attacks: dict[str, dict[str, Any]]) -> float | None:
    for data in attacks.values():
        fp = (data.get("summary") or {}).get("fp") or {}
        if fp.get("acc_base") is not None:
            return fp["acc_base"]
    return None


def recovered_rows(attacks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attack and precision: the recovered fraction with its 95% CI (the certificate's numbers)."""
    rows = []
    for kind, data in attacks.items():
        for precision, s in (data.get("summary") or {}).items():
            rec = s.get("recovered")
            rows.append({"attack": kind, "precision": precision,
                         "recovered fraction": "n/a" if rec is None else
                         f"{rec:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]",
                         "forget: base → unlearned → attacked": " → ".join(
                             "n/a" if s.get(k) is None else f"{s[k]:.3f}"
                             for k in ("acc_base", "acc_unlearned", "acc_attacked")),
                         "questions": f"{s.get('n', '?')} ({s.get('on', '?')})" if rec is not None else
                         s.get("reason", "")})
    return rows
