"""Circuit figures: a deterministic layered layout and edge-bucketed scatter traces (WebGL for many markers).

Layout: x = position in the residual stream (input at 0, the heads of layer L at 2L+1, the MLP of
layer L at 2L+2, logits last); y = head index for heads, centred for input, MLPs and logits.
Edges are pruned before drawing (top-n by |score|, optional |score| threshold, at most
`max_edges`), then drawn as at most 2 x `n_width_buckets` line traces (sign x width bucket),
so a 30k-edge graph costs one argpartition and a handful of traces. Traces are built as Scattergl and drawn in
WebGL when a figure has more than `WEBGL_MARKERS` markers, else as SVG: each line trace is one SVG path, and
below a few thousand markers SVG draws faster than WebGL, which in a browser without a GPU (software GL, headless
Chromium) took 2-7 s to draw the 300 edges of the default view (measured, bench/app_bench.py).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import plotly.graph_objects as go

from mansu.viz.artifacts import GraphData
from mansu.viz.graph_ops import (
    EDGE_CLASSES,
    GROUP_NODE_LIMIT,
    CADSplit,
    GraphDiff,
    align,
    cad_split,
    group_name,
    node_kind,
    node_label,
    pin_mask,
    prune,
)

POS_COLOR = "#1f77b4"   # positive edge score (supports the forget behaviour)
NEG_COLOR = "#d62728"   # negative edge score
HIGHLIGHT = "#ff7f0e"  # search matches and the pinned node's edges
MAX_EDGES = 2000
WEBGL_MARKERS = 5000    # above this many markers (nodes and edge hover points) a figure is drawn in WebGL


def for_renderer(traces: list[go.BaseTraceType]) -> list[go.BaseTraceType]:
    """The traces as SVG `go.Scatter` when they hold at most WEBGL_MARKERS markers (module docstring), else as
    built (Scattergl, WebGL)."""
    markers = sum(len(t.x) for t in traces if t.x is not None and "markers" in (t.mode or ""))
    if markers > WEBGL_MARKERS:
        return traces
    return [go.Scatter({k: v for k, v in t.to_plotly_json().items() if k != "type"})
            if isinstance(t, go.Scattergl) else t for t in traces]


def _head_index(names: list[str]) -> np.ndarray:
    """[n_nodes] head index of `a{L}.h{H}` nodes, -1 for every other node (MLPs, input, logits, grouped heads)."""
    return np.array([int(n.split(".h")[1]) if n.startswith("a") and ".h" in n else -1 for n in names], dtype=np.int64)


def node_positions(names: list[str], layers: np.ndarray) -> np.ndarray:
    """[n_nodes, 2] positions from names and layers alone: x = residual position (heads of layer L at 2L+1, the
    MLP at 2L+2, input 0, logits last), y = head index (other nodes, and a layer's grouped heads `a{L}.*`, centred)."""
    head = _head_index(names)
    centre = head.max() / 2.0 if head.size and head.max() >= 0 else 0.0
    layers = np.asarray(layers, dtype=np.float64)
    n_layers = float(layers.max()) if layers.size else 0.0
    is_attn = np.array([n.startswith("a") and (".h" in n or n.endswith(".*")) for n in names], dtype=bool)
    x = np.where(is_attn, 2 * layers + 1, 2 * layers + 2)
    x = np.where(np.array([n == "input" for n in names], dtype=bool), 0.0, x)
    x = np.where(np.array([n == "logits" for n in names], dtype=bool), 2 * n_layers + 1, x)
    y = np.where(head >= 0, head.astype(np.float64), centre)
    return np.stack([x, y], axis=1) if len(names) else np.zeros((0, 2))


def layout_positions(graph: GraphData) -> np.ndarray:
    """[n_nodes, 2] positions; depends only on node names, so it is stable across stages."""
    return node_positions(graph.names, graph.layers)


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
                colors: tuple[str, str] = (POS_COLOR, NEG_COLOR), name_prefix: str = "",
                values: np.ndarray | None = None, opacity_scale: float = 1.0) -> list[go.Scattergl]:
    """Kept edges bucketed by sign and |value| tercile-of-max into at most 2*n_width_buckets traces (`values`
    defaults to the edge scores)."""
    w = graph.weight if values is None else values
    labels = np.where(w[kept] >= 0, "+", "-").astype(object)
    return grouped_edge_traces(graph.src, graph.dst, kept, pos, np.abs(w), labels,
                               {"+": colors[0], "-": colors[1]}, n_width_buckets=n_width_buckets,
                               name_prefix=name_prefix, legend_suffix=" score", opacity_scale=opacity_scale)


def grouped_edge_traces(src: np.ndarray, dst: np.ndarray, kept: np.ndarray, pos: np.ndarray, magnitude: np.ndarray,
                        labels: np.ndarray, colors: dict[str, str], *, n_width_buckets: int = 3,
                        name_prefix: str = "", legend_suffix: str = "",
                        opacity_scale: float = 1.0) -> list[go.Scattergl]:
    """One Scattergl line trace per (label of `labels` [k], width bucket of `magnitude`): a handful of WebGL traces
    whatever the number of kept edges, the legend naming each label once with its edge count."""
    if kept.shape[0] == 0:
        return []
    mag = magnitude[kept]
    top = float(mag.max()) or 1.0
    bucket = np.minimum((mag / top * n_width_buckets).astype(int), n_width_buckets - 1)
    traces = []
    for label, color in colors.items():
        of_label = labels == label
        first = True
        for b in range(n_width_buckets - 1, -1, -1):  # widest first, so the legend entry is the boldest line
            sel = kept[of_label & (bucket == b)]
            if sel.shape[0] == 0:
                continue
            xs, ys = _segments(pos, src[sel], dst[sel])
            traces.append(go.Scattergl(
                x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=first,
                line={"color": color, "width": 0.6 + 2.2 * b}, opacity=(0.35 + 0.25 * b) * opacity_scale,
                name=f"{name_prefix}{label}{legend_suffix} ({int(of_label.sum()):,} edges)",
                legendgroup=f"{name_prefix}{label}"))
            first = False
    return traces


def edge_hover_trace(names: list[str], src: np.ndarray, dst: np.ndarray, kept: np.ndarray, pos: np.ndarray,
                     lines: list[str]) -> go.Scattergl:
    """Invisible markers near the kept edges' midpoints carrying their hover text (lines cannot hover in WebGL).
    Not at the midpoint itself: on the symmetric layout it can be a node's position (the MLP between two heads),
    and a hover point there takes the node's clicks; 45% along the edge, or 55% where that is a node too."""
    a, b = pos[src[kept]], pos[dst[kept]]
    mid = a + 0.45 * (b - a)
    on_node = np.isin(mid[:, 0] + 1j * mid[:, 1], pos[:, 0] + 1j * pos[:, 1])
    mid[on_node] = (a + 0.55 * (b - a))[on_node]
    text = [f"<b>{names[s]} → {names[d]}</b><br>{line}" for s, d, line in zip(src[kept].tolist(),
                                                                           dst[kept].tolist(), lines)]
    return go.Scattergl(x=mid[:, 0], y=mid[:, 1], mode="markers", marker={"size": 6, "opacity": 0},
                        hovertext=text, hoverinfo="text", showlegend=False, name="edges")


def node_hover(graph: GraphData) -> list[str]:
    """Hover text per node: label, score, owned parameters, in- and out-degree over all edges."""
    n = len(graph.names)
    indeg = np.bincount(graph.dst, minlength=n)
    outdeg = np.bincount(graph.src, minlength=n)
    return [f"<b>{name}</b> · {node_label(name)}{' (in circuit)' if graph.in_circuit[i] else ''}"
            f"<br>score {graph.scores[i]:.3g}<br>owned params: {_short_params(graph.params[i])}"
            f"<br>in edges {indeg[i]:,} · out edges {outdeg[i]:,}" for i, name in enumerate(graph.names)]


def _short_params(names: list[str]) -> str:
    """'q_proj, k_proj, v_proj, o_proj' from full parameter names; '-' when none."""
    if not names:
        return "-"
    short = [".".join(n.split(".")[-2:-1]) or n for n in names]
    return ", ".join(short[:6]) + (f" (+{len(short) - 6})" if len(short) > 6 else "")


_SYMBOL = {"head": "circle", "heads": "diamond", "mlp": "square", "input": "triangle-right", "logits": "star"}


def node_trace(graph: GraphData, pos: np.ndarray, pinned: str | list[str] | None = None,
               score_max: float | None = None, labels: bool = True,
               bright: np.ndarray | None = None) -> go.Scattergl:
    """All nodes as one trace (heads circles, MLPs squares, a layer's grouped heads diamonds); size and colour by
    score (on a shared scale when `score_max` is given, so side-by-side stages compare); circuit nodes are outlined,
    pinned nodes strongly; with `bright` ([n_nodes] bool) the other nodes are dimmed."""
    mag = np.abs(graph.scores)
    top = score_max if score_max else (float(mag.max()) if mag.size else 0.0)
    size = 8 + 14 * np.clip(mag / top, 0, 1) if top > 0 else np.full(mag.shape, 8.0)
    line_w = np.where(graph.in_circuit, 1.5, 0.5)
    pins = [pinned] if isinstance(pinned, str) else (pinned or [])
    at = graph.index()
    line_w[[at[p] for p in pins if p in at]] = 3.0
    return go.Scattergl(
        x=pos[:, 0], y=pos[:, 1], mode="markers+text" if labels else "markers",
        text=graph.names if labels else None, textposition="top center",
        textfont={"size": 9}, customdata=graph.names, hovertext=node_hover(graph), hoverinfo="text",
        marker={"size": size, "color": graph.scores, "colorscale": "RdBu", "cmin": -top if top > 0 else None,
                "cmax": top if top > 0 else None, "symbol": [_SYMBOL[node_kind(n)] for n in graph.names],
                "line": {"width": line_w, "color": "black"}, "showscale": True,
                "opacity": None if bright is None else np.where(bright, 1.0, 0.3),
                "colorbar": {"title": {"text": "node score"}, "thickness": 10}},
        name="nodes", showlegend=False,
    )


def marked_nodes_trace(names: list[str], pos: np.ndarray, marked: list[str], label: str,
                       color: str = HIGHLIGHT) -> go.Scattergl:
    """Open rings around `marked` nodes (search matches), drawn under the node trace."""
    index = {n: i for i, n in enumerate(names)}
    at = [index[n] for n in marked if n in index]
    return go.Scattergl(x=pos[at, 0], y=pos[at, 1], mode="markers", hoverinfo="skip",
                        marker={"size": 24, "symbol": "circle-open", "color": color, "line": {"width": 3}},
                        name=f"{label} ({len(at)})", showlegend=True)


PIN_LINK = "#a63603"     # edges among the pinned nodes


def pinned_edges_traces(full: GraphData, pins: list[str], pos: np.ndarray, index: dict[str, int],
                        limit: int = 40) -> tuple[list[go.Scattergl], np.ndarray]:
    """The subgraph of the pins drawn bold on top: every edge among the pinned nodes (dark), and each pinned node's
    strongest `limit` other incoming and outgoing edges of the full graph (one legend entry per pin). End points are
    placed on `pos` (indexed by `index`, group names for grouped drawings); a pinned node keeps its own position.
    Returns the traces and [len(pos)] bool: the drawn nodes these edges touch (the rest can be dimmed)."""
    fi = full.index()
    pins = [p for p in dict.fromkeys(pins) if p in fi]
    bright = np.zeros(pos.shape[0], dtype=bool)
    if not pins:
        return [], bright
    ats = np.array([fi[p] for p in pins], dtype=np.int64)
    full_positions = node_positions(full.names, full.layers)
    where = np.array([index.get(n, index.get(group_name(n), 0)) for n in full.names])
    slot = where.copy()
    slot[ats] = pos.shape[0] + np.arange(ats.shape[0])          # pinned nodes: their own point after `pos`
    points = np.vstack([pos, full_positions[ats]])
    pinned = pin_mask(full, pins)
    among = pinned[full.src] & pinned[full.dst]

    def strongest(mask: np.ndarray, k: int) -> np.ndarray:
        sel = np.flatnonzero(mask)
        return sel[np.argsort(-np.abs(full.weight[sel]), kind="stable")][:k]

    traces, drawn = [], []
    for pin, at in zip(pins, ats.tolist()):
        sel = strongest(((full.src == at) | (full.dst == at)) & ~among, limit)
        drawn.append(sel)
        if sel.shape[0]:
            xs, ys = _segments(points, slot[full.src[sel]], slot[full.dst[sel]])
            traces.append(go.Scattergl(x=xs, y=ys, mode="lines", line={"color": HIGHLIGHT, "width": 2.5},
                                       opacity=0.9, hoverinfo="skip", name=f"edges of {pin} (top {sel.shape[0]})",
                                       legendgroup="pins"))
    inner = strongest(among, 4 * limit)
    if inner.shape[0]:
        drawn.append(inner)
        xs, ys = _segments(points, slot[full.src[inner]], slot[full.dst[inner]])
        traces.append(go.Scattergl(x=xs, y=ys, mode="lines", line={"color": PIN_LINK, "width": 4}, opacity=0.95,
                                   hoverinfo="skip", name=f"edges among the pins ({inner.shape[0]})",
                                   legendgroup="pins"))
    sel = np.concatenate(drawn)
    bright[where[full.src[sel]]] = True
    bright[where[full.dst[sel]]] = True
    bright[where[ats]] = True
    traces.append(go.Scattergl(x=full_positions[ats, 0], y=full_positions[ats, 1], mode="markers+text", text=pins,
                               textposition="bottom center", hoverinfo="skip", showlegend=False, name="pinned",
                               marker={"size": 14, "color": HIGHLIGHT, "line": {"width": 2, "color": "black"}}))
    traces.append(edge_hover_trace(full.names, full.src, full.dst, sel, full_positions,
                                   [f"score {w:.3g}" for w in full.weight[sel].tolist()]))
    return traces, bright


def _axes(fig: go.Figure, graph_names: list[str], layers: np.ndarray, title: str, height: int = 560) -> None:
    """Layer ticks on x (L0 heads, L0 MLP, ...), head index on y, and the shared interaction settings."""
    n_layers = int(np.max(layers)) if len(graph_names) else 0
    every = max(1, n_layers // 16)
    ticks = [0.0] + [2.0 * layer + 1.5 for layer in range(0, n_layers, every)] + [2.0 * n_layers + 1]
    text = ["input"] + [f"L{layer}" for layer in range(0, n_layers, every)] + ["logits"]
    fig.update_layout(
        title=title, height=height, hovermode="closest",
        xaxis={"title": "layer (each layer: its heads, then its MLP)", "showgrid": False, "zeroline": False,
               "tickvals": ticks, "ticktext": text},
        yaxis={"title": "head index (MLPs, input and logits centred)", "showgrid": False, "zeroline": False},
        margin={"l": 40, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.15},
        clickmode="event+select", dragmode="pan",
    )


def circuit_figure(graph: GraphData, *, top_n: int | None = 300, threshold: float = 0.0,
                   max_edges: int = MAX_EDGES, pinned: str | list[str] | None = None, title: str = "",
                   score_max: float | None = None, highlight: list[str] | None = None,
                   full: GraphData | None = None) -> go.Figure:
    """The layered circuit: pruned edge traces (sign x width) and their hover points, search rings, the subgraph of
    the pinned nodes (from `full`, the ungrouped graph, when `graph` is grouped; the rest dimmed), then one node
    trace (last)."""
    pos = layout_positions(graph)
    pruned = prune(graph.weight, min(max_edges, top_n) if top_n else max_edges, threshold)
    kept = pruned.kept
    pins = [pinned] if isinstance(pinned, str) else list(pinned or [])
    pin_traces, bright = pinned_edges_traces(full or graph, pins, pos, graph.index())
    focus = bool(pin_traces)
    traces: list[go.BaseTraceType] = [*edge_traces(graph, kept, pos, opacity_scale=0.3 if focus else 1.0)]
    traces.append(edge_hover_trace(graph.names, graph.src, graph.dst, kept, pos,
                                   [f"score {w:.3g}" for w in graph.weight[kept].tolist()]))
    if highlight:
        traces.append(marked_nodes_trace(graph.names, pos, highlight, "search matches"))
    traces += pin_traces
    traces.append(node_trace(graph, pos, pins, score_max, labels=len(graph.names) <= GROUP_NODE_LIMIT,
                             bright=bright if focus else None))
    fig = go.Figure(for_renderer(traces))
    _axes(fig, graph.names, graph.layers, title or pruned.summary())
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


DiffColour = Literal["change", "split"]
CHANGE_COLORS = ("#2ca02c", "#9467bd")   # after - before: green up, purple down
SPLIT_COLORS = dict(zip(EDGE_CLASSES, ("#1f77b4", "#9467bd", "#d62728", "#ff7f0e", "#cccccc", "#888888")))  # in order
SPLIT_RULE = ("CAD split (over the original circuit's edges, as in mansu.attribution.cad_parts): CAD = shrinkage + "
              "reversal + rerouting. Shrinkage is the net scale change |S−T|/(S+T) (S, T: the circuit's total "
              "|score| before and after), shared among the edges that shrank with it; reversal is the part a flip of "
              "the whole circuit's sign explains (the readout reversed through an unchanged circuit; 0 unless most "
              "of the circuit flipped), shared among the flipped edges; rerouting is the rest of CAD: edges flipping "
              "against the circuit's orientation, and redistribution (edges moving against the net change). "
              "Colours: blue = circuit edge, same sign, smaller (shrinkage); purple = circuit edge that flipped with "
              "the reversed circuit (reversal); red = circuit edge that flipped against it or grew (rerouting); "
              "orange = edge outside the circuit whose |score| grew (rerouting that CAD does not see, counted "
              "apart); light grey = other edges outside the circuit.")


def diff_nodes(diff: GraphDiff, change: np.ndarray) -> GraphData:
    """A node-only GraphData for a diff: score = the summed |change| of each node's edges; circuit nodes marked."""
    n = len(diff.names)
    touched = np.bincount(diff.src, np.abs(change), n) + np.bincount(diff.dst, np.abs(change), n)
    in_circuit = np.zeros(n, dtype=bool)
    in_circuit[diff.src[diff.in_circuit]] = True
    in_circuit[diff.dst[diff.in_circuit]] = True
    return GraphData(diff.names, diff.layers, touched, [[] for _ in diff.names], diff.src, diff.dst, change,
                     in_circuit, {})


def graph_diff_figure(diff: GraphDiff, *, colour: DiffColour = "change", relative: bool = False,
                      top_n: int = 300, max_edges: int = MAX_EDGES, split: CADSplit | None = None,
                      highlight: list[str] | None = None, title: str = "") -> go.Figure:
    """Edges of two graphs on one fixed layout: width = |change| (absolute, or relative to |before|), colour = the
    sign of the change or its CAD class (shrinkage / rerouting / outside circuit); the top_n largest |change|."""
    if colour not in ("change", "split"):
        raise ValueError(f"colour must be 'change' or 'split', got {colour!r}")
    change = diff.change(relative)
    nodes = diff_nodes(diff, diff.change(False))
    pos = layout_positions(nodes)
    pruned = prune(change, min(top_n, max_edges))
    kept = pruned.kept
    if colour == "change":
        labels = np.where(change[kept] >= 0, "Δ+", "Δ-").astype(object)
        colors = {"Δ+": CHANGE_COLORS[0], "Δ-": CHANGE_COLORS[1]}
    else:
        split = split or cad_split(diff)
        labels = split.edge_class[kept]
        colors = SPLIT_COLORS
    unit = "%" if relative else ""
    scale = 100.0 if relative else 1.0
    lines = [f"before {s:.3g} → after {t:.3g}<br>change {c * scale:+.3g}{unit}"
             + (f" · {cls}" if split is not None else "")
             for s, t, c, cls in zip(diff.before[kept].tolist(), diff.after[kept].tolist(), change[kept].tolist(),
                                     (split.edge_class[kept] if split is not None else [""] * kept.shape[0]))]
    traces: list[go.BaseTraceType] = [
        *grouped_edge_traces(diff.src, diff.dst, kept, pos, np.abs(change), labels, colors),
        edge_hover_trace(diff.names, diff.src, diff.dst, kept, pos, lines)]
    if highlight:
        traces.append(marked_nodes_trace(diff.names, pos, highlight, "search matches"))
    node = node_trace(nodes, pos, labels=len(diff.names) <= GROUP_NODE_LIMIT)
    node.marker.colorbar.title.text = "Σ|change| of its edges"
    node.marker.colorscale = "Greys"
    node.marker.cmin = 0
    traces.append(node)
    fig = go.Figure(for_renderer(traces))
    kind = "relative change (after − before)/|before|, clipped at ±200%" if relative else "change (after − before)"
    _axes(fig, diff.names, diff.layers, f"{title + ' · ' if title else ''}{kind}"
          f"<br><sup>{pruned.summary().replace('|score|', '|change|')}</sup>")
    return fig


def diff_figure(before: GraphData, after: GraphData, *, top_n: int = 300, max_edges: int = MAX_EDGES,
                title: str = "", colour: DiffColour = "change", relative: bool = False,
                circuit_edges: list[tuple[str, str]] | None = None) -> go.Figure:
    """Edges of the before- and after-graph on before's layout, coloured by change (after - before); width by
    |change| (`graph_diff_figure` on `align(before, after)`)."""
    diff = align(before, after, circuit_edges)
    return graph_diff_figure(diff, colour=colour, relative=relative, top_n=top_n, max_edges=max_edges,
                             title=title or "change of edge score (after − before): green up, purple down")
