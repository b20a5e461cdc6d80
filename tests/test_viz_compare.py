"""Cross-run figures and the report: accuracies and gaps read from metrics.json, CAD intervals,
scorecard rows, a self-contained HTML report and PNG/SVG export through Debian's Chromium."""

import os
from pathlib import Path

import pytest

from mansu.viz import report
from mansu.viz.compare import (
    accuracy,
    cad_figure,
    cad_value,
    edge_contributions,
    forget_drop,
    fp_nf4_bars,
    ptq_gap,
    quadrant_figure,
)

METRICS = {"base_fp": {"forget": {"accuracy": 1.0}, "retain": {"accuracy": 1.0}},
           "unlearned_fp": {"forget": {"accuracy": 0.25, "ci_low": 0.2, "ci_high": 0.3}, "retain": {"accuracy": 0.9}},
           "unlearned_nf4": {"forget": {"accuracy": 0.75}, "retain": {"accuracy": 0.88}}}
CAD = {"after_fp": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7, "per_edge": {"a->b": 0.1}},
       "after_nf4": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5, "per_edge": {"a->b": 0.1, "c->d": 0.3},
                     "parts": {"redistribution": {"value": 0.4, "ci_low": 0.35, "ci_high": 0.45},
                               "outside_shift": {"value": 0.0, "ci_low": -0.1, "ci_high": 0.1},
                               "moved_beyond_noise": {"value": 0.4, "ci_low": 0.35, "ci_high": 0.45}}}}


def test_accuracy_gap_and_drop():
    acc = accuracy(METRICS, "unlearned_fp", "forget")
    assert (acc.value, acc.low, acc.high) == (0.25, 0.2, 0.3)
    assert accuracy(METRICS, "base_nf4", "forget") is None
    assert forget_drop(METRICS) == pytest.approx(0.75)
    assert ptq_gap(METRICS) == pytest.approx(0.5)
    assert ptq_gap({}) is None
    assert ptq_gap({**METRICS, "ptq_gap": {"forget": {"gap": 0.125}}}) == 0.125
    assert forget_drop(METRICS, "nf4") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="'fp' or 'nf4'"):
        forget_drop(METRICS, "bf16")


def test_cad_values_and_contributions():
    assert cad_value(CAD, "fp") == (0.6, 0.5, 0.7)
    assert cad_value(CAD, "nf4") == (0.4, 0.3, 0.5)
    assert cad_value({"status": "not available", "reason": "no circuit"}, "fp") is None
    assert cad_value(None) is None
    assert edge_contributions(CAD) == [("c->d", 0.3), ("a->b", 0.1)]
    assert edge_contributions(CAD, "fp") == [("a->b", 0.1)]
    assert edge_contributions({"after_nf4": {"value": 0.5, "per_edge": {"u->v": -0.5, "x->y": 0.1}}}) == [
        ("u->v", -0.5), ("x->y", 0.1)]
    fig = cad_figure(CAD)
    assert [t.name for t in fig.data] == ["CAD fp pooled", "CAD nf4 pooled", "contribution"]
    assert cad_value(CAD, "nf4", "per_fact") is None                   # a run from before per-fact CAD
    fact = {**CAD, "after_nf4": {**CAD["after_nf4"], "per_fact": {"cad": {"value": 0.45, "ci_low": 0.42,
                                                                          "ci_high": 0.48}}}}
    assert cad_value(fact, "nf4", "per_fact") == (0.45, 0.42, 0.48)
    assert [t.name for t in cad_figure(fact).data] == ["CAD fp pooled", "CAD nf4 pooled", "CAD nf4 per fact",
                                                       "contribution"]
    with pytest.raises(ValueError, match="estimator"):
        cad_value(CAD, "nf4", "median")


def test_bars_and_quadrant():
    fig = fp_nf4_bars({"mansu": METRICS, "empty": {}})
    assert [t.name for t in fig.data] == ["forget fp", "forget NF4", "retain fp", "retain NF4"]
    assert list(fig.data[0].x) == ["mansu"] and fig.data[1].y[0] == 0.75
    q = quadrant_figure({"mansu": (0.7, 0.6), "ga": (0.5, 0.05)}, drop_margin=0.1, cad_threshold=0.3)
    assert list(q.data[0].text) == ["mansu", "ga"]
    assert {a.text for a in q.layout.annotations} >= {"structural erasure", "behavioural suppression"}


def test_scorecard_rows_from_the_real_scorecard():
    from mansu.scorecard import build_scorecard

    metrics = {**METRICS, "ptq_gap": {"forget": {"gap": 0.5, "ci_low": 0.4, "ci_high": 0.6}}}
    rows = report.scorecard_rows(build_scorecard(metrics, CAD))
    assert [r.name for r in rows] == ["forgetting", "retain", "ptq_gap", "structural_erasure"]
    assert [r.passed for r in rows] == [True, False, False, True]
    assert rows[0].value == pytest.approx(1.0) and rows[3].value == 0.4    # all of 1.0 - chance 0.25 forgotten
    assert report.badge(rows[0]) == "✓ meaningful forgetting" and report.badge(rows[2]) == "✗ non-positive PTQ gap"
    assert report.badge_markdown(rows[2]) == ":red-badge[✗ non-positive PTQ gap (margin -0.750)]"
    missing = report.scorecard_rows(build_scorecard(metrics, None))
    assert missing[3].passed is None and report.badge(missing[3]).startswith("?")
    assert report.scorecard_rows(None) == []
    at_chance = {**metrics, "base_fp": {"forget": {"accuracy": 0.25}, "retain": {"accuracy": 1.0}}}
    rows = report.scorecard_rows(build_scorecard(at_chance, CAD))
    assert [r.passed for r in rows] == [None, False, None, None] and report.badge(rows[0]).startswith("∅")
    assert "nothing to forget" in report.scorecard_html(rows)


def test_report_html_is_self_contained():
    figs = {"bars": fp_nf4_bars({"m": METRICS}), "cad": cad_figure(CAD)}
    from mansu.scorecard import build_scorecard

    html = report.build_report_html("r <1>", figs, build_scorecard(METRICS, CAD), {"lr": 1e-5}, {"torch": "2.13"})
    assert "r &lt;1&gt;" in html
    assert html.count("<script src=") == 0          # no CDN: plotly.js is inlined
    assert html.count("Plotly.newPlot") == 2
    assert "class='pass'" in html and "&quot;torch&quot;: &quot;2.13&quot;" in html
    assert len(html) > 1_000_000                    # the inlined plotly.js bundle


@pytest.mark.skipif(report.find_browser() is None and os.environ.get("CI", "").lower() in ("", "0", "false"),
                    reason="no chromium (CI not set)")
def test_export_images_png_and_svg(tmp_path):
    result = report.export_images({"bars / fp": fp_nf4_bars({"m": METRICS})}, tmp_path)
    assert result.error is None
    names = sorted(p.name for p in result.written)
    assert names == ["bars___fp.png", "bars___fp.svg"]
    assert (tmp_path / "bars___fp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "bars___fp.svg").read_bytes()[:400]


def test_export_images_degrades_without_browser(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "find_browser", lambda: None)
    result = report.export_images({"x": fp_nf4_bars({})}, tmp_path)
    assert result.written == [] and "no Chrome/Chromium" in result.error
    with pytest.raises(ValueError, match="accepted are png, svg, pdf"):
        report.export_images({}, Path(tmp_path), formats=("gif",))
