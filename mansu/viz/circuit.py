"""Circuit figures: a deterministic layered layout and edge-bucketed Scattergl traces.

Layout: x = position in the residual stream (input at 0, the heads of layer L at 2L+1, the MLP of
layer L at 2L+2, logits last); y = head index for heads, centred for input, MLPs and logits.
Edges are pruned before drawing (top-n by |score|, optional |score| threshold, at most
`max_edges`), then drawn as at most 2 x `n_width_buckets` Scattergl traces (sign x width bucket),
so a 30k-edge graph costs one argpartition and a handful of traces.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import plotly.graph_objects as go

from mansu.viz.artifacts import GraphData

POS_COLOR = "#1f77b4"   # positive edge score (supports the forget behaviour)
NEG_COLOR = "#d62728"   # negative edge score
MAX_EDGES = 2000


def layout_positions(graph: GraphData) -> np.ndarray:
    """[n_nodes, 2] positions; depends only on node names, so it is stable across stages."""
    heads = [int(n.split(".h")[1]) for n in graph.names if n.startswith("a") and ".h" in n]
    centre = (max(heads) / 2.0) if heads else 0.0
    pos = np.zeros((len(graph.names), 2))
    n_layers = int(graph.layers.max()) if len(graph.names) else 0
    for i, name in enumerate(graph.names):
        layer = int(graph.layers[i])
        if name == "input":
            pos[i] = (0.0, centre)
        elif name == "logits":
            pos[i] = (2.0 * n_layers + 1.0, centre)
        elif ".h" in name:
            pos[i] = (2.0 * layer + 1.0, float(name.split(".h")[1]))
        else:
            pos[i] = (2.0 * layer + 2.0, centre)
    return pos


def select_edges(weight: np.ndarray, *, top_n: int | None = None, threshold: float = 0.0,
                 max_edges: int = MAX_EDGES) -> np.ndarray:
    """Indices of the kept edges, sorted by decreasing |score|: |w| >= threshold, top-n, <= max_edges."""
    if max_edges < 1:
        raise ValueError(f"max_edges must be >= 1, got {max_edges}")
    mag = np.abs(weight)
    candidates = np.flatnonzero(mag >= threshold) if threshold > 0 else np.arange(mag.shape[0])
    k = min(max_edges, top_n if top_n is not None else max_edges, candidates.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < candidates.shape[0]:
        part = np.argpartition(-mag[candidates], k - 1)[:k]
        candidates = candidates[part]
    return candidates[np.argsort(-mag[candidates], kind="stable")]


def _segments(pos: np.ndarray, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y arrays with NaN breaks: one polyline per edge, a single trace for many edges."""
    n = src.shape[0]
    xs = np.full(3 * n, np.nan)
    ys = np.full(3 * n, np.nan)
    xs[0::3], xs[1::3] = pos[src, 0], pos[dst, 0]
    ys[0::3], ys[1::3] = pos[src, 1], pos[dst, 1]
    return xs, ys


def edge_traces(graph: GraphData, kept: np.ndarray, pos: np.ndarray, *, n_width_buckets: int = 3,
                colors: tuple[str, str] = (POS_COLOR, NEG_COLOR), name_prefix: str = "") -> list[go.Scattergl]:
    """Kept edges bucketed by sign and |score| tercile-of-max into at most 2*n_width_buckets traces."""
    if kept.shape[0] == 0:
        return []
    w = graph.weight[kept]
    mag = np.abs(w)
    top = float(mag.max()) or 1.0
    bucket = np.minimum((mag / top * n_width_buckets).astype(int), n_width_buckets - 1)
    traces = []
    for sign, color, label in ((1, colors[0], "+"), (-1, colors[1], "-")):
        first = True
        for b in range(n_width_buckets - 1, -1, -1):  # widest first, so the legend entry is the boldest line
            sel = kept[((w >= 0) if sign > 0 else (w < 0)) & (bucket == b)]
            if sel.shape[0] == 0:
                continue
            xs, ys = _segments(pos, graph.src[sel], graph.dst[sel])
            n_sign = int(((w >= 0) if sign > 0 else (w < 0)).sum())
            traces.append(go.Scattergl(
                x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=first,
                line={"color": color, "width": 0.6 + 2.2 * b}, opacity=0.35 + 0.25 * b,
                name=f"{name_prefix}{label} score ({n_sign} edges)", legendgroup=f"{name_prefix}{label}",
            ))
            first = False
    return traces


def node_hover(graph: GraphData) -> list[str]:
    """Hover text per node: score, owned parameters, in- and out-degree over all edges."""
    n = len(graph.names)
    indeg = np.bincount(graph.dst, minlength=n)
    outdeg = np.bincount(graph.src, minlength=n)
    return [f"<b>{name}</b>{' (in circuit)' if graph.in_circuit[i] else ''}<br>score {graph.scores[i]:.4g}"
            f"<br>owned params: {_short_params(graph.params[i])}"
            f"<br>in edges {indeg[i]} · out edges {outdeg[i]}" for i, name in enumerate(graph.names)]


def _short_params(names: list[str]) -> str:
    """'q_proj, k_proj, v_proj, o_proj' from full parameter names; '-' when none."""
    if not names:
        return "-"
    short = [".".join(n.split(".")[-2:-1]) or n for n in names]
    return ", ".join(short[:6]) + (f" (+{len(short) - 6})" if len(short) > 6 else "")


def node_trace(graph: GraphData, pos: np.ndarray, pinned: str | None = None,
               score_max: float | None = None) -> go.Scattergl:
    """All nodes as one trace; size and colour by score (on a shared scale when `score_max` is given, so
    side-by-side stages compare); circuit nodes are outlined, the pinned node strongly."""
    mag = np.abs(graph.scores)
    top = score_max if score_max else (float(mag.max()) if mag.size else 0.0)
    size = 8 + 14 * np.clip(mag / top, 0, 1) if top > 0 else np.full(mag.shape, 8.0)
    line_w = [3.0 if name == pinned else (1.5 if graph.in_circuit[i] else 0.5) for i, name in enumerate(graph.names)]
    return go.Scattergl(
        x=pos[:, 0], y=pos[:, 1], mode="markers+text", text=graph.names, textposition="top center",
        textfont={"size": 9}, customdata=graph.names, hovertext=node_hover(graph), hoverinfo="text",
        marker={"size": size, "color": graph.scores, "colorscale": "RdBu", "cmin": -top if top > 0 else None,
                "cmax": top if top > 0 else None,
                "line": {"width": line_w, "color": "black"}, "showscale": True,
                "colorbar": {"title": {"text": "node score"}, "thickness": 10}},
        name="nodes", showlegend=False,
    )


def circuit_figure(graph: GraphData, *, top_n: int | None = 300, threshold: float = 0.0,
                   max_edges: int = MAX_EDGES, pinned: str | None = None, title: str = "",
                   score_max: float | None = None) -> go.Figure:
    """The layered circuit: pruned edge traces (sign x width) under one node trace."""
    pos = layout_positions(graph)
    kept = select_edges(graph.weight, top_n=top_n, threshold=threshold, max_edges=max_edges)
    fig = go.Figure([*edge_traces(graph, kept, pos), node_trace(graph, pos, pinned, score_max)])
    fig.update_layout(
        title=title or f"{kept.shape[0]} of {graph.n_edges} edges", height=560, hovermode="closest",
        xaxis={"title": "layer (input → heads · MLP → logits)", "showgrid": False, "zeroline": False},
        yaxis={"title": "component (head index)", "showgrid": False, "zeroline": False},
        margin={"l": 40, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.15},
        clickmode="event+select", dragmode="pan",
    )
    return fig


EdgeDirection = Literal["in", "out"]


def node_edges(graph: GraphData, node: str, direction: EdgeDirection, limit: int = 50) -> list[dict[str, object]]:
    """The edges into or out of `node`, sorted by |score|, as table rows."""
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
    idx = graph.index()
    if node not in idx:
        raise ValueError(f"node {node!r} is not in the graph")
    mask = (graph.dst if direction == "in" else graph.src) == idx[node]
    sel = np.flatnonzero(mask)
    sel = sel[np.argsort(-np.abs(graph.weight[sel]), kind="stable")][:limit]
    return [{"source": graph.names[graph.src[i]], "target": graph.names[graph.dst[i]],
             "score": float(graph.weight[i])} for i in sel]


def _aligned_weights(before: GraphData, after: GraphData) -> tuple[np.ndarray, np.ndarray]:
    """`after` edge scores in `before`'s edge order (0 where after lacks the edge)."""
    key_after = {(after.names[s], after.names[d]): w for s, d, w in zip(after.src, after.dst, after.weight)}
    aligned = np.array([key_after.get((before.names[s], before.names[d]), 0.0)
                        for s, d in zip(before.src, before.dst)])
    return before.weight, aligned


def diff_figure(before: GraphData, after: GraphData, *, top_n: int = 300, max_edges: int = MAX_EDGES,
                title: str = "") -> go.Figure:
    """Edges of the before-graph coloured by change (after - before); width by |change|."""
    w_before, w_after = _aligned_weights(before, after)
    change = w_after - w_before
    diff_graph = GraphData(before.names, before.layers, before.scores, before.params, before.src,
                           before.dst, change, before.in_circuit, before.meta)
    pos = layout_positions(before)
    kept = select_edges(change, top_n=top_n, max_edges=max_edges)
    traces = edge_traces(diff_graph, kept, pos, colors=("#2ca02c", "#9467bd"), name_prefix="Δ")
    fig = go.Figure([*traces, node_trace(before, pos)])
    fig.update_layout(title=title or "change of edge score (after − before): green up, purple down",
                      height=520, margin={"l": 40, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.15}, xaxis={"showgrid": False},
                      yaxis={"showgrid": False})
    return fig
