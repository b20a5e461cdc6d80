"""The method x quantizer PTQ-gap heatmap (mansu.matrix): pure plotly, no streamlit."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from mansu.matrix import GapCell, cell_text, cells_for


def _hover(cell: GapCell | None) -> str:
    if cell is None:
        return "not scored"
    units = f"{cell.n_questions} questions" + (f" × {cell.n_runs} seeds" if cell.n_runs > 1 else "")
    return f"gap {cell_text(cell).replace(' [', '<br>95% CI [')}<br>{units}"


def _short(gap: float) -> str:
    text = f"{gap:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def gap_matrix_figure(cells: Sequence[GapCell], base: str) -> go.Figure:
    """Methods (rows) x quantizers (columns) of one base: the pooled forget PTQ gap as colour on a diverging scale
    centred at 0 (red: the quantizer brings forgotten answers back), the gap printed in each cell and its 95% CI on
    hover."""
    methods, quants, by = cells_for(cells, base)
    if not methods:
        raise ValueError(f"no matrix cell for base {base!r}; bases with cells: "
                         f"{', '.join(dict.fromkeys(c.base for c in cells)) or 'none'}")
    z = [[by[m, q].gap if (m, q) in by else None for q in quants] for m in methods]
    hover = [[_hover(by.get((m, q))) for q in quants] for m in methods]
    shown = [[("*" if by[m, q].significant else "") + _short(by[m, q].gap) if (m, q) in by else "" for q in quants]
             for m in methods]
    reach = max([abs(v) for row in z for v in row if v is not None] + [0.05])  # symmetric: white is exactly 0
    fig = go.Figure(go.Heatmap(z=z, x=quants, y=methods, customdata=hover, text=shown, texttemplate="%{text}",
                               hovertemplate="%{y} under %{x}<br>%{customdata}<extra></extra>",
                               colorscale="RdBu_r", zmin=-reach, zmax=reach,
                               colorbar={"title": "PTQ gap"}))
    fig.update_layout(title=f"forget PTQ gap, acc(quantized) − acc(fp), {base} base (* : 95% CI excludes 0)",
                      xaxis={"side": "top"}, yaxis={"autorange": "reversed"},
                      height=max(260, 34 * len(methods) + 140), margin={"l": 10, "r": 10, "t": 90, "b": 10})
    return fig
