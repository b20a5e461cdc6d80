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
    assert len(fig.data) <= 7
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
