"""Survival figures: the headline, histograms normalised to fractions on a log axis with the 1.0
line, and the code-change heatmap matrix (NaN where a layer is missing)."""

import math

import pytest

from mansu.viz import survival as sv


def _entry(median, frac, counts=(1, 3, 0, 6)):
    return {"median_ratio": median, "code_changed_fraction": frac,
            "histogram": {"edges": [1e-3, 1e-2, 1e-1, 1.0, 10.0], "counts": list(counts)}}


def test_headline_states_the_ratio():
    assert sv.headline({"overall": _entry(0.02, 0.1)}).startswith("the median update is 50x below")
    assert sv.headline({"overall": _entry(1.5, 0.9)}).startswith("the median update is 1.50 NF4 bin widths")
    assert sv.headline({"overall": {"quantiles": {"0.5": 0.25}}}).startswith("the median update is 4x below")
    assert sv.headline({"overall": {}}) is None
    assert sv.headline({"overall": _entry(0.0, 0.0)}) is None


def test_histogram_of_validates_shape():
    h = sv.histogram_of(_entry(0.1, 0.1))
    assert h.counts.tolist() == [1, 3, 0, 6]
    assert sv.histogram_of({"histogram": {"edges": [1, 2], "counts": [1, 2]}}) is None
    assert sv.histogram_of({}) is None


def test_histogram_figure_fractions_log_axis_and_unit_line():
    fig = sv.histogram_figure({"a": sv.histogram_of(_entry(0.1, 0.1)), "b": sv.histogram_of(_entry(1, 1, (0, 0, 0,
                                                                                                          5)))})
    assert fig.layout.xaxis.type == "log"
    assert len(fig.data) == 2
    assert max(fig.data[0].y) == pytest.approx(0.6)
    assert max(fig.data[1].y) == pytest.approx(1.0)
    assert any(s.x0 == 1.0 and s.x1 == 1.0 for s in fig.layout.shapes)


def test_code_change_matrix_and_grouping():
    tensors = {"model.layers.0.mlp.down_proj.weight": _entry(0.1, 0.25),
               "model.layers.1.mlp.down_proj.weight": _entry(0.1, 0.5),
               "model.layers.1.self_attn.q_proj.weight": _entry(0.1, 0.75)}
    rows = sv.by_kind_and_layer(tensors)
    labels, layers, z = sv.code_change_matrix(rows)
    assert labels == ["down_proj", "q_proj"] and layers == ["0", "1"]
    assert z[0].tolist() == [0.25, 0.5]
    assert math.isnan(z[1, 0]) and z[1, 1] == 0.75
    fig = sv.code_change_heatmap(rows)
    assert fig.data[0].zmax == 1.0


def test_per_layer_accepts_list_or_mapping():
    assert list(sv.per_layer({"per_layer": [{"layer": 3, "median_ratio": 1}]})) == ["3"]
    assert list(sv.per_layer({"per_layer": {"0": {}, "1": {}}})) == ["0", "1"]
    assert sv.layer_of("model.layers.12.self_attn.o_proj.weight") == "12"
    assert sv.layer_of("lm_head.weight") == "other"


def test_bare_counts_with_shared_edges_and_overflow_bins():
    report = {"histogram_edges": [1e-2, 1e-1, 1.0], "headline": "from the report",
              "overall": {"histogram": [1, 2, 3, 4]}}  # [under, bin, bin, over]
    h = sv.histogram_of(sv.overall(report), sv.shared_edges(report))
    assert h.edges.tolist() == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    assert h.counts.tolist() == [1, 2, 3, 4]
    assert sv.histogram_of({"histogram": [1, 2]}, [1e-2, 1e-1, 1.0]).counts.tolist() == [1, 2]
    assert sv.histogram_of({"histogram": [1, 2, 3, 4, 5]}, [1e-2, 1e-1, 1.0]) is None
    assert sv.headline(report) == "from the report"  # no median: the report's own sentence
    assert sv.headline({**report, "overall": {"median_ratio": 0.01}}).startswith("the median update is 100x below")


def test_alignment_summary_and_figure():
    metrics = {"base_alignment": {"setting": "nf4-grid", "mean_distance": 0.0, "frac_on_grid": 1.0,
                                  "histogram": [8, 0, 0, 0]}}
    assert sv.alignment_summary(metrics)["setting"] == "nf4-grid"
    assert sv.alignment_summary({}) is None and sv.alignment_summary({"base_alignment": {"x": 1}}) is None
    fig = sv.alignment_figure({"grid": [8, 0, 0, 0], "natural": [1, 1, 1, 1]})
    assert max(fig.data[0].y) == 1.0 and max(fig.data[1].y) == 0.25
    assert fig.data[0].x[0] == 0.0 and fig.data[0].x[-1] == 1.0
