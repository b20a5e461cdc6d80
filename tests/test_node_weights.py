"""Weights under the circuit (mansu.viz.node_weights) and the spread over records (mansu.viz.record_spread) on a
real tiny run: the per-node counts partition the run's own update and agree with the survival analysis, computed
apart by mansu.quant.survival; the per-record edge scores average to the stored graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mansu.runs import layout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One MANSU run of the real pipeline on a tiny saved Llama (every stage, about 12 s)."""
    from mansu.pipeline import RunSpec, run_pipeline, start_run
    from mansu.testing import write_tiny_world

    world = write_tiny_world(tmp_path_factory.mktemp("world"))
    spec = RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], base_alignment="nf4-grid",
                   unlearn={"method": "mansu", "steps": 2, "batch_size": 4, "k": 2, "n_fisher": 4,
                            "update_fraction": 0.01, "epsilon": 1e6}, attribution_records=4, ig_steps=2)
    run = start_run(spec, root=tmp_path_factory.mktemp("runs"))
    run_pipeline(run)
    return run


@pytest.fixture(scope="module")
def report(tiny_run):
    from mansu.viz.node_weights import node_weight_report

    return node_weight_report(tiny_run)


def test_node_counts_partition_the_stored_update(tiny_run, report):
    circuit = set(json.loads((tiny_run / layout.CIRCUIT).read_text())["nodes"])
    touched = {n for n, w in report.nodes.items() if w.touched}
    assert touched and touched <= circuit                       # MANSU writes only the circuit's weights
    assert sum(w.touched for w in report.nodes.values()) == report.n_touched > 0   # no GQA: heads own disjoint rows
    head = report.nodes["a0.h0"]
    assert head.owned == 4 * 16 * 64                            # q, k, v rows and o columns: 4 x head_dim x d_model
    assert report.nodes["m0"].owned == 3 * 64 * 128
    assert all(w.updated <= w.touched <= w.owned for w in report.nodes.values())


def test_codes_changed_and_ratios_match_the_survival_analysis(tiny_run, report):
    survival = json.loads((tiny_run / layout.SURVIVAL).read_text())
    changed = sum(t["n_code_changed_updated"] + t["n_code_changed_not_updated"] for t in survival["tensors"].values())
    assert sum(w.codes_changed["nf4"] for w in report.nodes.values()) == changed > 0
    counts = np.sum([w.ratio_counts for w in report.nodes.values() if w.ratio_counts], axis=0)
    assert counts.tolist() == survival["overall"]["histogram"]   # the same |delta|/bin, bin for bin
    for w in report.nodes.values():
        # int4-g128 takes rows of a multiple of 128: only down_proj ([64, 128]) of the hidden-64 model
        assert w.coverage["int4-g128"] == (64 * 128 if w.node.startswith("m") else 0)
        assert (w.row()["int4-g128 codes changed"] is None) == w.node.startswith("a")
        if w.touched:
            assert 0 < w.codes_changed_pct("nf4") <= 100 and w.median_ratio >= 0.5


def test_edges_before_and_after_and_bad_node(tiny_run, report):
    from mansu.viz.artifacts import load_graph
    from mansu.viz.node_weights import node_edge_scores, node_weight_report

    node = next(n for n, w in report.nodes.items() if w.touched)
    graphs = {s: load_graph(tiny_run, s) for s in layout.ATTRIBUTION_STAGES}
    rows = node_edge_scores(graphs, node, limit=5)
    assert len(rows) == 5 and all(node in r["edge"] for r in rows)
    before = [abs(r["before"]) for r in rows]
    assert before == sorted(before, reverse=True) and all(r["after_nf4"] is not None for r in rows)
    with pytest.raises(ValueError, match="unknown node name"):
        node_weight_report(tiny_run, nodes=["q7"])


def test_spread_over_records_averages_to_the_graph(tiny_run):
    from mansu.viz.artifacts import load_graph
    from mansu.viz.record_spread import edge_spread, per_record_scores, spread_figure

    up, down, per_record, valid = per_record_scores(tiny_run, "before")
    assert per_record.shape[0] == 4                                   # the run's 4 attribution records
    spread = edge_spread(up, down, per_record, valid, top_k=6, circuit={("a0.h0", "a1.h3")})
    graph = load_graph(tiny_run, "before")
    stored = {(graph.names[s], graph.names[d]): w for s, d, w in zip(graph.src, graph.dst, graph.weight)}
    assert spread.mean == pytest.approx([stored[e] for e in spread.edges], rel=1e-5)
    assert abs(spread.mean[0]) == pytest.approx(max(abs(w) for w in stored.values()), rel=1e-5)
    for row in spread.rows():
        assert 0 <= row["same sign %"] <= 100 and 25 <= row["top record %"] <= 100
    assert len(spread_figure(spread).data) == 6


def test_one_record_artefact_is_flagged():
    from mansu.viz.record_spread import edge_spread

    per_record = np.zeros((5, 2, 2))
    per_record[:, 0, 0] = [1.0, 1.1, 0.9, 1.0, 1.0]                  # steady over records
    per_record[:, 0, 1] = [0.0, 0.0, 9.0, 0.1, 0.0]                  # one prompt's artefact, larger mean
    valid = np.array([[True, True], [False, False]])
    rows = edge_spread(["u0", "u1"], ["v0", "v1"], per_record, valid, top_k=2).rows()
    assert [r["edge"] for r in rows] == ["u0 → v1", "u0 → v0"]
    assert [r["one record"] for r in rows] == [True, False] and rows[1]["same sign %"] == 100
    with pytest.raises(ValueError, match="top_k"):
        edge_spread(["u0"], ["v0"], per_record[:, :1, :1], valid[:1, :1], top_k=0)


def test_a_graph_without_per_record_scores_says_so(tmp_path):
    from mansu.testing import write_sample_run
    from mansu.viz.record_spread import per_record_scores

    run = write_sample_run(tmp_path / "runs", "mansu", 0, 0.3)
    assert per_record_scores(run, "before") is None and per_record_scores(run, "after_nf4") is None


def test_reading_only_the_touched_weights_gives_the_whole_base_report(tiny_run, report):
    """The lean path (a meta skeleton and the touched tensors read and aligned alone) equals loading and aligning
    the whole base, number for number."""
    from mansu.unlearn.model_update import read_model_update
    from mansu.viz import node_weights as nw

    values, meta = read_model_update(tiny_run / layout.MODEL_UPDATE)
    lean = nw._lean_base(nw._base_path(tiny_run), meta["dtype"], meta["base_alignment"], 64, list(values))
    assert lean is not None and next(lean[0].parameters()).is_meta
    whole = nw._aligned_base(tiny_run, meta)
    params = dict(whole.named_parameters())
    assert all(lean[1][n].equal(params[n].detach()) for n in values)       # bit-exact alignment, tensor by tensor
    full = nw.report_for_model(whole, values, alignment=meta["base_alignment"])
    assert [w.row() for w in full.nodes.values()] == [w.row() for w in report.nodes.values()]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tensor_by_tensor_alignment_matches_the_whole_model_alignment(family):
    """A seeded partial alignment (nf4:0.5) of a few tensors alone equals aligning the whole model (Conv1D too)."""
    import copy

    from mansu.testing import tiny_model
    from mansu.unlearn.nf4_model import align_base
    from mansu.viz.node_weights import _align_tensors

    model = tiny_model(family, hidden=64)
    whole = copy.deepcopy(model)
    align_base(whole, "nf4:0.5")
    names = [n for n, _ in model.named_parameters() if n.endswith("weight") and ".1." in n]   # layer 1 only
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    aligned = _align_tensors(model, base, "nf4:0.5", 64)
    expected = dict(whole.named_parameters())
    assert all(aligned[n].equal(expected[n].detach()) for n in names)
    assert any(not aligned[n].equal(base[n]) for n in names)                   # something was aligned


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_neuron_grain_mlp_owns_what_its_circuit_mask_owns(family):
    """With the circuit's kept neurons, an MLP node's weights are exactly its circuit mask's entries (Conv1D too):
    the owned count equals the mask's, and the parts cover the mask and nothing else."""
    import torch

    from mansu.attribution.circuit import Circuit, circuit_parameter_masks
    from mansu.testing import tiny_model
    from mansu.viz import node_weights as nw

    model = tiny_model(family, hidden=64)
    neurons = {"m1": [1, 5, 6, 40]}
    masks = circuit_parameter_masks(model, Circuit([("m0", "m1"), ("m1", "logits")], neurons=neurons))
    params = dict(model.named_parameters())
    covered = {}
    for pname, parts in nw.ownership(model, ["m1"], neurons).items():
        mask = covered.setdefault(pname, torch.zeros(params[pname].shape, dtype=torch.bool))
        for _, dim, part in parts:
            mask.index_fill_(dim, part, True)
    m1 = {n: m for n, m in masks.items() if ".1.mlp." in n or ".h.1.mlp." in n}
    assert set(covered) == set(m1) and all(torch.equal(covered[n], m1[n]) for n in m1)
    report = nw.report_for_model(model, {}, nodes=["m1"], neurons=neurons)
    assert report.nodes["m1"].owned == sum(int(m.sum()) for m in m1.values())
