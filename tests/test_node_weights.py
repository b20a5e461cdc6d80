"""Weights under the circuit (mansu.viz.node_weights) on a real tiny run: the per-node counts partition the run's
own update and agree with the survival analysis, computed apart by mansu.quant.survival."""

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
