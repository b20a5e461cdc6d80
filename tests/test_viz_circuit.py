"""Circuit figure builders: pruning keeps exactly the strongest edges, traces are bucketed by sign,
the layout depends only on node names, and a 30k-edge graph is drawn with at most 2k edges."""

import math

import numpy as np
import pytest

from mansu.testing import synthetic_graph
from mansu.viz.artifacts import graph_from_dict, node_layer
from mansu.viz.circuit import (
    MAX_EDGES,
    circuit_figure,
    diff_figure,
    edge_traces,
    layout_positions,
    node_edges,
    select_edges,
)


def test_select_edges_is_top_n_by_magnitude():
    w = np.array([0.1, -5.0, 2.0, -0.5, 3.0, 0.0])
    assert select_edges(w, top_n=3).tolist() == [1, 4, 2]
    assert select_edges(w, threshold=1.0).tolist() == [1, 4, 2]
    assert select_edges(w, top_n=10, max_edges=2).tolist() == [1, 4]
    assert select_edges(w, threshold=100.0).size == 0
    with pytest.raises(ValueError, match="max_edges"):
        select_edges(w, max_edges=0)


def test_select_edges_matches_full_sort_on_large_input():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(40_000)
    kept = select_edges(w, top_n=1500)
    assert kept.tolist() == np.argsort(-np.abs(w), kind="stable")[:1500].tolist()


def _drawn_edges(trace) -> int:
    x = np.asarray(trace.x, dtype=float)
    return int(np.isnan(x).sum())  # one NaN break per edge


def test_edge_traces_bucket_by_sign_and_cover_every_kept_edge():
    g = synthetic_graph(3, 4, seed=1)
    kept = select_edges(g.weight, top_n=100)
    traces = edge_traces(g, kept, layout_positions(g), n_width_buckets=3)
    assert 1 <= len(traces) <= 6
    assert sum(_drawn_edges(t) for t in traces) == kept.size
    n_pos = int((g.weight[kept] >= 0).sum())
    assert sum(_drawn_edges(t) for t in traces if t.legendgroup == "+") == n_pos
    assert all(t.type == "scattergl" for t in traces)


def test_layout_depends_only_on_names():
    g = synthetic_graph(2, 3)
    pos = layout_positions(g)
    perm = np.random.default_rng(0).permutation(len(g.names))
    data = {"nodes": [{"name": g.names[i]} for i in perm], "links": []}
    g2 = graph_from_dict(data)
    pos2 = layout_positions(g2)
    for i, name in enumerate(g2.names):
        assert pos2[i].tolist() == pos[g.names.index(name)].tolist()
    x = dict(zip(g.names, pos[:, 0]))
    assert x["input"] < x["a0.h0"] < x["m0"] < x["a1.h2"] < x["m1"] < x["logits"]


def test_graph_from_dict_accepts_edges_and_unknown_nodes():
    g = graph_from_dict({"nodes": [{"name": "input"}, {"name": "m0", "score": 2.0, "params": ["w.down"],
                                                       "in_circuit": True}],
                         "edges": [{"source": "input", "target": "m0", "score": 0.5},
                                   {"source": "m0", "target": "logits", "weight": -1.5}]})
    assert g.names == ["input", "m0", "logits"]
    assert g.weight.tolist() == [0.5, -1.5]
    assert g.layers.tolist() == [-1, 0, 1]
    assert g.params[1] == ["w.down"] and g.in_circuit.tolist() == [False, True, False]
    with pytest.raises(ValueError):
        graph_from_dict({"links": []})
    assert node_layer("a3.h7", 5) == 3
    with pytest.raises(ValueError, match="unknown node name"):
        node_layer("x9", 5)


def test_node_edges_sorted_and_validated():
    g = graph_from_dict({"nodes": ["input", "m0", "m1", "logits"],
                         "links": [{"source": "input", "target": "m1", "weight": 0.1},
                                   {"source": "m0", "target": "m1", "weight": -2.0},
                                   {"source": "m1", "target": "logits", "weight": 1.0}]})
    rows = node_edges(g, "m1", "in")
    assert [r["source"] for r in rows] == ["m0", "input"]
    assert node_edges(g, "m1", "out") == [{"source": "m1", "target": "logits", "score": 1.0}]
    with pytest.raises(ValueError, match="not in the graph"):
        node_edges(g, "m7", "in")
    with pytest.raises(ValueError, match="direction"):
        node_edges(g, "m1", "sideways")


def test_30k_edge_graph_draws_at_most_max_edges():
    g = synthetic_graph(16, 16, seed=0)
    assert g.n_edges >= 30_000
    fig = circuit_figure(g, top_n=None)
    edges = sum(_drawn_edges(t) for t in fig.data if t.mode == "lines")
    assert edges == MAX_EDGES
    assert len(fig.data) <= 8  # 6 edge traces, their hover points, the nodes
    assert len(fig.data[-1].x) == len(g.names)


def test_diff_figure_colours_the_change():
    before = graph_from_dict({"nodes": ["input", "m0", "logits"],
                              "links": [{"source": "input", "target": "m0", "weight": 1.0},
                                        {"source": "m0", "target": "logits", "weight": 2.0}]})
    after = graph_from_dict({"nodes": ["input", "m0", "logits"],
                             "links": [{"source": "m0", "target": "logits", "weight": 2.5}]})
    fig = diff_figure(before, after)
    up = [t for t in fig.data if t.mode == "lines" and t.legendgroup == "Δ+"]
    down = [t for t in fig.data if t.mode == "lines" and t.legendgroup == "Δ-"]
    assert sum(_drawn_edges(t) for t in up) == 1      # m0->logits rose by 0.5
    assert sum(_drawn_edges(t) for t in down) == 1    # input->m0 vanished: -1.0
    assert math.isclose(float(np.nanmax(np.asarray(down[0].x, dtype=float))), 2.0)


def test_shared_score_scale_for_side_by_side_stages():
    g = synthetic_graph(2, 4, seed=3)
    top = float(np.abs(g.scores).max())
    own = circuit_figure(g).data[-1].marker
    shared = circuit_figure(g, score_max=4 * top).data[-1].marker
    assert own.cmax == pytest.approx(top) and shared.cmax == pytest.approx(4 * top)
    assert max(shared.size) < max(own.size)  # the same node looks smaller against a larger shared maximum


# ----------------------------------------------------------------------------- pruning, grouping, search, diff, export

def test_prune_reports_the_pruned_mass():
    from mansu.viz.graph_ops import prune

    w = np.array([0.5, -3.0, 1.0, -0.5])
    p = prune(w, 2)
    assert p.kept.tolist() == [1, 2]
    assert p.kept_mass == pytest.approx(4.0 / 5.0) and p.pruned_mass == pytest.approx(0.2)
    assert "2 of 4 edges drawn" in p.summary() and "20% pruned" in p.summary()
    assert prune(w, None).pruned_mass == 0.0
    with pytest.raises(ValueError, match="top_k"):
        prune(w, 0)


def test_grouping_sums_edges_per_layer_pair_and_keeps_the_total():
    from mansu.viz.graph_ops import group_by_layer

    g = synthetic_graph(3, 4, seed=2)
    grouped = group_by_layer(g)
    assert grouped.names == ["input", "a0.*", "m0", "a1.*", "m1", "a2.*", "m2", "logits"]
    assert grouped.weight.sum() == pytest.approx(g.weight.sum())
    # a0.* -> m1 is the sum of every head of layer 0 into m1
    idx, gi = g.index(), grouped.index()
    heads0 = [idx[f"a0.h{h}"] for h in range(4)]
    want = g.weight[np.isin(g.src, heads0) & (g.dst == idx["m1"])].sum()
    got = grouped.weight[(grouped.src == gi["a0.*"]) & (grouped.dst == gi["m1"])]
    assert got.tolist() == [pytest.approx(want)]
    assert grouped.meta["members"]["a2.*"] == [f"a2.h{h}" for h in range(4)]


def test_543k_edge_graph_is_drawn_grouped_with_at_most_max_edges():
    from mansu.viz.graph_ops import group_by_layer

    g = synthetic_graph(32, 32, seed=0)
    assert g.n_edges > 540_000
    grouped = group_by_layer(g)
    fig = circuit_figure(grouped, top_n=2000, full=g, pinned="a5.h3", highlight=["a5.*"])
    assert sum(_drawn_edges(t) for t in fig.data if t.mode == "lines" and t.legendgroup in ("+", "-")) <= 2000
    assert len(fig.data[-1].x) == len(grouped.names) == 66
    pinned = [t for t in fig.data if (t.name or "").startswith("edges of a5.h3")]
    assert pinned and _drawn_edges(pinned[0]) == 40


def test_search_puts_exact_matches_first():
    from mansu.viz.graph_ops import search_nodes

    names = ["input", "a1.h3", "a1.h30", "a11.h3", "m1", "logits"]
    assert search_nodes(names, "a1.h3") == ["a1.h3", "a1.h30"]
    assert search_nodes(names, "M1, logits") == ["m1", "logits"]
    assert search_nodes(names, "  ") == []


def _tiny(edges: dict[tuple[str, str], float]):
    names = ["input", "a0.h0", "a0.h1", "m0", "logits"]
    return graph_from_dict({"nodes": names, "links": [{"source": u, "target": v, "weight": w}
                                                      for (u, v), w in edges.items()]})


def test_align_takes_the_union_of_edges_on_before_layout():
    from mansu.viz.graph_ops import align

    a = _tiny({("input", "m0"): 1.0, ("m0", "logits"): 2.0})
    b = _tiny({("m0", "logits"): 1.5, ("a0.h1", "logits"): -0.5})
    d = align(a, b, [("m0", "logits")])
    edges = {(d.names[s], d.names[t]): (x, y) for s, t, x, y in zip(d.src, d.dst, d.before, d.after)}
    assert edges == {("input", "m0"): (1.0, 0.0), ("m0", "logits"): (2.0, 1.5), ("a0.h1", "logits"): (0.0, -0.5)}
    assert d.in_circuit.sum() == 1 and d.names == a.names
    rel = d.change(relative=True)
    assert sorted(rel.tolist()) == pytest.approx([-2.0, -1.0, -0.25])   # a new edge clips at -200%


def test_cad_split_sums_to_cad_and_separates_shrinkage_from_rerouting():
    import torch

    from mansu.attribution.cad import cad_value
    from mansu.attribution.cad_parts import parts_of
    from mansu.viz.graph_ops import align, cad_split

    circuit = [("input", "m0"), ("m0", "logits"), ("a0.h0", "m0"), ("a0.h1", "logits")]
    s = {("input", "m0"): 1.0, ("m0", "logits"): 2.0, ("a0.h0", "m0"): -1.0, ("a0.h1", "logits"): 0.5}
    uniform = cad_split(align(_tiny(s), _tiny({e: v / 10 for e, v in s.items()}), circuit))
    assert uniform.cad == pytest.approx(0.9 / 1.1) and uniform.shrinkage == pytest.approx(uniform.cad)
    assert uniform.rerouting == 0.0 and set(uniform.edge_class[:4]) <= {"shrinkage"}
    flipped = cad_split(align(_tiny(s), _tiny({e: -v for e, v in s.items()}), circuit))   # the readout reversed
    assert flipped.cad == pytest.approx(1.0) and flipped.shrinkage == 0.0 and flipped.rerouting == 0.0
    assert flipped.reversal == pytest.approx(1.0) and set(flipped.edge_class[:4]) == {"reversal"}
    assert flipped.edge_reversal.sum() == pytest.approx(1.0)
    # reversed, and one edge kept its sign against the flip: that edge is rerouting, the rest reversal
    t_rev = {e: (v if e == ("a0.h1", "logits") else -v / 2) for e, v in s.items()}
    d_rev = align(_tiny(s), _tiny(t_rev), circuit)
    rev = cad_split(d_rev)
    expected = parts_of(*(torch.tensor([x[e] for e in circuit], dtype=torch.float64) for x in (s, t_rev)),
                        torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    for part in ("cad", "shrinkage", "reversal", "rerouting"):
        assert getattr(rev, part) == pytest.approx(float(expected[part])), part
    assert rev.reversal > 0 and rev.rerouting > 0 and rev.shrinkage > 0
    assert rev.edge_reversal.sum() == pytest.approx(rev.reversal)
    assert rev.edge_rerouting.sum() == pytest.approx(rev.rerouting)
    assert min(rev.edge_shrinkage.min(), rev.edge_reversal.min(), rev.edge_rerouting.min()) >= 0
    cls_rev = {(d_rev.names[a], d_rev.names[b]): c for a, b, c in zip(d_rev.src, d_rev.dst, rev.edge_class)}
    assert cls_rev[("a0.h1", "logits")] == "rerouting" and cls_rev[("m0", "logits")] == "reversal"
    t = {("input", "m0"): 0.2, ("m0", "logits"): -1.0, ("a0.h0", "m0"): -1.5, ("a0.h1", "logits"): 0.5,
         ("a0.h1", "m0"): 0.7}                               # mixed: shrink, flip, grow, same; a new outside edge
    d = align(_tiny(s), _tiny(t), circuit)
    mixed = cad_split(d)
    order = [d.names.index(u) * 100 + d.names.index(v) for u, v in circuit]
    keyed = dict(zip(d.src * 100 + d.dst, range(len(d.src))))
    sv = torch.tensor([d.before[keyed[k]] for k in order])
    tv = torch.tensor([d.after[keyed[k]] for k in order])
    assert mixed.cad == pytest.approx(float(cad_value(sv, tv)))
    assert mixed.shrinkage == pytest.approx(abs(4.5 - 3.2) / 7.7)
    assert mixed.edge_shrinkage.sum() == pytest.approx(mixed.shrinkage)
    assert mixed.reversal == 0.0 and not mixed.edge_reversal.any()      # the circuit kept its orientation
    assert (mixed.edge_shrinkage + mixed.edge_rerouting).sum() == pytest.approx(mixed.cad)
    cls = {(d.names[a], d.names[b]): c for a, b, c in zip(d.src, d.dst, mixed.edge_class)}
    assert cls[("input", "m0")] == "shrinkage" and cls[("m0", "logits")] == "rerouting"
    assert cls[("a0.h0", "m0")] == "rerouting" and cls[("a0.h1", "m0")] == "grew outside circuit"
    assert mixed.outside_gain == pytest.approx(0.7 / 7.7)


def test_diff_figure_split_colours_edges_by_class():
    from mansu.viz.circuit import SPLIT_COLORS, graph_diff_figure
    from mansu.viz.graph_ops import align

    a = _tiny({("input", "m0"): 1.0, ("m0", "logits"): 2.0})
    b = _tiny({("input", "m0"): 0.5, ("m0", "logits"): 2.5, ("a0.h0", "m0"): 1.0})
    fig = graph_diff_figure(align(a, b, [("input", "m0"), ("m0", "logits")]), colour="split")
    lines = {t.legendgroup: t.line.color for t in fig.data if t.mode == "lines"}
    assert lines == {"shrinkage": SPLIT_COLORS["shrinkage"], "rerouting": SPLIT_COLORS["rerouting"],
                     "grew outside circuit": SPLIT_COLORS["grew outside circuit"]}
    c = _tiny({("input", "m0"): -0.5, ("m0", "logits"): -2.0})           # the whole circuit flipped sign
    fig = graph_diff_figure(align(a, c, [("input", "m0"), ("m0", "logits")]), colour="split")
    assert {t.legendgroup for t in fig.data if t.mode == "lines"} == {"reversal"}
    with pytest.raises(ValueError, match="colour"):
        graph_diff_figure(align(a, b), colour="rainbow")


def test_subgraph_exports_csv_with_labels_and_circuit_tracer_json():
    import csv
    import io

    from mansu.viz.graph_ops import prune, subgraph_csv, subgraph_tracer_json

    g = synthetic_graph(2, 3, seed=4)
    kept = prune(g.weight, 5).kept
    rows = list(csv.DictReader(io.StringIO(subgraph_csv(g, kept, [(g.names[g.src[kept[0]]],
                                                                    g.names[g.dst[kept[0]]])]))))
    assert len(rows) == 5 and rows[0]["in_circuit"] == "True" and rows[1]["in_circuit"] == "False"
    assert float(rows[0]["score"]) == pytest.approx(g.weight[kept[0]], rel=1e-5)
    head = next(r for r in rows if r["source"].startswith("a"))
    layer, h = head["source"][1:].split(".h")
    assert head["source_label"] == f"layer {layer} head {h}"
    data = subgraph_tracer_json(g, kept, slug="x")
    assert len(data["links"]) == 5 and data["metadata"]["slug"] == "x"
    by_id = {n["node_id"]: n for n in data["nodes"]}
    weights = sorted(-link["weight"] for link in data["links"])
    assert weights == pytest.approx(sorted(g.weight[kept].tolist()), rel=1e-5)   # circuit-tracer's sign: -score
    from mansu.viz.graph_ops import node_label

    for node in data["nodes"]:                                   # clerp: our name and its human label
        name = node["clerp"].split(" (")[0]
        assert node["clerp"] == f"{name} ({node_label(name)})"
    assert {link["source"] for link in data["links"]} | {link["target"] for link in data["links"]} <= set(by_id)


def test_load_graph_reads_every_edge_from_the_dense_tensors(tmp_path):
    import torch

    from mansu.attribution.eap import AttributionGraph
    from mansu.attribution.edges import valid_matrix
    from mansu.attribution.serialize import save_graph
    from mansu.viz.artifacts import load_graph

    up = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    down = up[1:] + ["logits"]
    valid = valid_matrix(up, down)
    scores = torch.randn(len(up), len(down), generator=torch.Generator().manual_seed(0)) * valid
    graph = AttributionGraph(up, down, scores, valid, torch.zeros(2), torch.zeros(2),
                             metadata={"n_layers": 2, "n_heads": 2})
    save_graph(graph, tmp_path, "before", max_links=5)            # the JSON keeps 5 links, the tensors all
    loaded = load_graph(tmp_path, "before")
    assert loaded.n_edges == int(valid.sum()) > 5
    got = {(loaded.names[s], loaded.names[d]): w for s, d, w in zip(loaded.src, loaded.dst, loaded.weight)}
    assert got == {(u, v): pytest.approx(s) for u, v, s in graph.edges()}


def test_pins_draw_their_subgraph_and_dim_the_rest():
    from mansu.viz.graph_ops import pin_subgraph

    g = synthetic_graph(4, 4, seed=1)
    pins = ["a1.h2", "m2", "a3.h0"]
    at = g.index()
    ends = {at[p] for p in pins}
    sub = pin_subgraph(g, pins)
    assert set(sub.tolist()) == {i for i in range(g.n_edges) if g.src[i] in ends or g.dst[i] in ends}
    assert np.all(np.diff(np.abs(g.weight[sub])) <= 0)                        # strongest first
    strong = pin_subgraph(g, pins, threshold=float(np.median(np.abs(g.weight[sub]))))
    assert 0 < strong.shape[0] < sub.shape[0] and set(strong.tolist()) <= set(sub.tolist())
    n_among = sum(1 for i in range(g.n_edges) if g.src[i] in ends and g.dst[i] in ends)
    assert n_among == 3                                                       # a1.h2 -> m2 -> a3.h0, a1.h2 -> a3.h0
    fig = circuit_figure(g, pinned=pins)
    names = [t.name or "" for t in fig.data]
    own = {p: sum(1 for i in range(g.n_edges) if at[p] in (g.src[i], g.dst[i]) and not (
        g.src[i] in ends and g.dst[i] in ends)) for p in pins}                # its edges, less those among pins
    assert [n for n in names if n.startswith("edges of ")] == [f"edges of {p} (top {min(40, own[p])})" for p in pins]
    among = next(t for t in fig.data if (t.name or "").startswith("edges among the pins"))
    assert _drawn_edges(among) == n_among and among.name == f"edges among the pins ({n_among})"
    nodes = fig.data[-1]
    assert all(np.asarray(nodes.marker.opacity)[at[p]] == 1.0 for p in pins)
    assert list(np.asarray(nodes.marker.line.width)[[at[p] for p in pins]]) == [3.0] * 3
    big = synthetic_graph(8, 8, seed=1)                  # 74 nodes: a pin's top 40 edges reach at most 41
    opacity = np.asarray(circuit_figure(big, pinned=["a3.h3"]).data[-1].marker.opacity)
    assert opacity[big.index()["a3.h3"]] == 1.0 and 0 < (opacity < 1).sum() <= len(big.names) - 2
    dimmed = [t.opacity for t in fig.data if t.mode == "lines" and t.legendgroup in ("+", "-")]
    plain = [t.opacity for t in circuit_figure(g).data if t.mode == "lines" and t.legendgroup in ("+", "-")]
    assert max(dimmed) < min(plain)
    assert circuit_figure(g, pinned=["nowhere"]).data[-1].marker.opacity is None   # an unknown pin: no focus


def test_figures_draw_svg_below_the_webgl_marker_count_and_webgl_above():
    import plotly.graph_objects as go

    from mansu.viz.circuit import WEBGL_MARKERS, for_renderer

    fig = circuit_figure(synthetic_graph(4, 4, seed=0), top_n=300, pinned="m1")
    assert {t.type for t in fig.data} == {"scatter"}                  # a few hundred markers: SVG
    assert fig.data[-1].customdata[0] == "input" and fig.data[-1].marker.symbol is not None
    many = [go.Scattergl(x=np.arange(WEBGL_MARKERS), y=np.arange(WEBGL_MARKERS), mode="markers"),
            go.Scattergl(x=[0, 1, None], y=[0, 1, None], mode="lines")]
    assert [t.type for t in for_renderer(many)] == ["scatter", "scatter"]     # exactly WEBGL_MARKERS: still SVG
    many.append(go.Scattergl(x=[2], y=[2], mode="markers+text"))
    assert [t.type for t in for_renderer(many)] == ["scattergl"] * 3


def test_edge_hover_points_never_sit_on_a_node():
    g = synthetic_graph(4, 8, seed=0)          # symmetric: a0.h1 -> a1.h6 has its midpoint on m0
    fig = circuit_figure(g, top_n=None)
    hover = next(t for t in fig.data if t.name == "edges")
    nodes = {(float(x), float(y)) for x, y in zip(fig.data[-1].x, fig.data[-1].y)}
    pos = layout_positions(g)
    mids = {(float(x), float(y)) for x, y in (pos[g.src] + pos[g.dst]) / 2}
    assert mids & nodes                                                   # the midpoints would collide
    assert not {(float(x), float(y)) for x, y in zip(hover.x, hover.y)} & nodes
