"""The method x quantizer PTQ-gap matrix (mansu/matrix.py), its heatmap (mansu/viz/matrix.py), its section in
`mansu compare`'s table and in the reviewer report: known gaps on fixed per-question correctness, intervals that
contain the truth and exclude 0 only when they should, question-clustered pooling over seeds, determinism."""

from __future__ import annotations

import argparse
import html as htmllib
import re

import pytest

from mansu.commands.compare import render
from mansu.matrix import MatrixRun, gap_matrix, markdown_table, paired_differences, pooled_gap, summary
from mansu.runs.store import load_run
from mansu.testing import write_sample_run
from mansu.viz.matrix import gap_matrix_figure
from mansu.viz.reviewer import reviewer_report

N = 120


def metrics(fp_right: int, quant_right: dict[str, int], *, shift: int = 0) -> dict:
    """metrics.json with per-question forget correctness: fp answers questions [shift, shift+fp_right), quantizer q
    answers those and the next quant_right[q] - fp_right ones."""
    def split(k: int) -> dict:
        c = [int(shift <= i < shift + k) for i in range(N)]
        return {"forget": {"accuracy": sum(c) / N, "correct": c}}
    return {"unlearned_fp": split(fp_right), "unlearned_quant": {q: split(k) for q, k in quant_right.items()}}


def test_known_gaps_and_intervals():
    runs = [MatrixRun("nf4-grid", "graddiff", metrics(60, {"nf4": 120, "fp4": 118, "int8": 61, "int4-g128": 100})),
            MatrixRun("nf4-grid", "mansu", metrics(60, {"nf4": 60, "fp4": 61, "int8": 60, "int4-g128": 59}))]
    cells = {(c.method, c.quantizer): c for c in gap_matrix(runs)}
    big = cells["graddiff", "nf4"]
    assert big.gap == pytest.approx(0.5) and big.ci_low < 0.5 < big.ci_high and big.ci_low > 0.35 and big.significant
    assert cells["graddiff", "int4-g128"].gap == pytest.approx(40 / 120) and cells["graddiff", "int4-g128"].ci_low > 0
    small = cells["graddiff", "int8"]  # one question back of 120: the interval includes 0
    assert small.gap == pytest.approx(1 / 120) and small.ci_low <= 0 <= small.ci_high and not small.significant
    assert cells["mansu", "nf4"].gap == 0 and (cells["mansu", "nf4"].ci_low, cells["mansu", "nf4"].ci_high) == (0, 0)
    assert cells["mansu", "int4-g128"].gap == pytest.approx(-1 / 120)  # sign: acc(quantized) - acc(fp)
    assert [c.quantizer for c in gap_matrix(runs)][:4] == ["nf4", "fp4", "int8", "int4-g128"]


def test_pooling_over_seeds_resamples_questions_not_question_seed_pairs():
    """Three identical seeds carry the information of one: the clustered CI equals the single run's, where treating
    the 360 (question, seed) pairs as independent would shrink it by about sqrt(3)."""
    one = metrics(40, {"nf4": 70})
    single = gap_matrix([MatrixRun("b", "m", one)])[0]
    pooled = gap_matrix([MatrixRun("b", "m", one)] * 3)[0]
    assert (pooled.gap, pooled.ci_low, pooled.ci_high) == (single.gap, single.ci_low, single.ci_high)
    assert pooled.n_runs == 3 and pooled.n_questions == N
    iid = pooled_gap([paired_differences(one, "nf4")] * 3 + [[0.0]])  # unequal lengths: (run, question) units
    assert iid[3] == 3 * N + 1 and iid[2] - iid[1] < (single.ci_high - single.ci_low) * 0.75
    # two seeds that disagree: the pooled gap is their mean
    two = gap_matrix([MatrixRun("b", "m", metrics(40, {"nf4": 70})), MatrixRun("b", "m", metrics(40, {"nf4": 50}))])
    assert two[0].gap == pytest.approx((30 + 10) / 2 / N)


def test_deterministic_and_nf4_falls_back_to_the_headline():
    runs = [MatrixRun("b", "m", metrics(50, {"nf4": 70, "fp4": 65}))]
    assert gap_matrix(runs) == gap_matrix(runs)
    old = metrics(50, {})
    old["unlearned_nf4"] = metrics(70, {})["unlearned_fp"]  # a run from before per-quantizer scoring
    assert gap_matrix([MatrixRun("b", "m", old)])[0].gap == pytest.approx(20 / N)
    assert gap_matrix([MatrixRun("b", "m", {"unlearned_fp": {"forget": {"accuracy": 0.5}}})]) == []
    with pytest.raises(ValueError, match="at least one run"):
        pooled_gap([])


def test_table_and_summary_say_what_the_numbers_show():
    runs = [MatrixRun("nf4-grid", "graddiff", metrics(60, {"nf4": 120, "int8": 61})),
            MatrixRun("nf4-grid", "mansu", metrics(60, {"nf4": 60, "int8": 60}))]
    cells = gap_matrix(runs)
    table = markdown_table(cells, "nf4-grid")
    assert table.splitlines()[0] == "| method | nf4 | int8 |"
    assert re.search(r"\| graddiff \| \*\*\+0\.500 \[\+0\.\d+, \+0\.\d+\]\*\* \| \+0\.008 \[", table)
    text = summary(cells, "nf4-grid")
    assert "nf4 brings forgotten answers back (interval above 0) for graddiff (+0.500)." in text
    assert "int8 brings none back for any method." in text
    assert "No quantizer significantly undoes what mansu changed" in text
    args = argparse.Namespace(seeds=1, retain_eval_limit=10, attribution_records=4, ig_steps=2)
    row = {"run_id": "r", "method": "mansu", "seed": 0, "base": "nf4-grid", "forget_fp": 0.5, "forget_nf4": 0.5,
           "ptq_gap": 0.0, "retain_fp": 0.9, "cad_nf4": 0.4, "median_ratio": 1.0, "params_touched": 10,
           "wall_seconds": 1.0, "all_pass": True, "pass": {k: True for k in
                                                           ("forgetting", "retain", "ptq_gap", "structural_erasure")}}
    doc = render([row], {"nf4-grid": type("C", (), {"metrics": {}})()}, {}, 60.0, args, cells=cells)
    assert "### Method x quantizer PTQ-gap matrix" in doc and table in doc and text in doc
    assert "[localisation.md](localisation.md) (`mansu sweep localisation`)" in doc      # the companion pages
    assert "PTQ-gap matrix" not in render([row], {"nf4-grid": type("C", (), {"metrics": {}})()}, {}, 60.0, args)


def test_heatmap_shape_colour_scale_and_hover_ci():
    runs = [MatrixRun("nf4-grid", m, metrics(60, {"nf4": k, "fp4": k, "int8": 60}))
            for m, k in (("graddiff", 120), ("mansu", 60), ("npo", 100))]
    runs.append(MatrixRun("natural", "mansu", metrics(60, {"nf4": 58})))
    cells = gap_matrix(runs)
    fig = gap_matrix_figure(cells, "nf4-grid")
    heat = fig.data[0]
    assert list(heat.y) == ["graddiff", "mansu", "npo"] and list(heat.x) == ["nf4", "fp4", "int8"]
    assert len(heat.z) == 3 and all(len(r) == 3 for r in heat.z) and heat.z[0][0] == pytest.approx(0.5)
    assert heat.zmin == -heat.zmax and heat.zmax >= 0.5  # centred at 0: white is no gap
    graddiff_nf4 = next(c for c in cells if (c.base, c.method, c.quantizer) == ("nf4-grid", "graddiff", "nf4"))
    assert f"95% CI [{graddiff_nf4.ci_low:+.3f}, {graddiff_nf4.ci_high:+.3f}]" in heat.customdata[0][0]
    assert "%{customdata}" in heat.hovertemplate and heat.text[0][0] == "*+0.50" and heat.text[1][2] == "0.00"
    assert list(gap_matrix_figure(cells, "natural").data[0].y) == ["mansu"]
    with pytest.raises(ValueError, match="no matrix cell for base 'int4-g128-grid'; bases with cells: nf4-grid, "
                                         "natural"):
        gap_matrix_figure(cells, "int4-g128-grid")


def text_of(doc: str) -> str:
    doc = re.sub(r"<script.*?</script>", "", doc, flags=re.S)
    return " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", doc)).split())


def test_report_has_the_matrix_when_it_covers_several_methods(tmp_path):
    root = tmp_path / "runs"
    recall = {"nf4": 0.5, "fp4": 0.4, "int8": 0.0, "int4-g128": 0.3}
    paths = [write_sample_run(root, "mansu", 0, 0.3, quant_recall={q: 0.0 for q in recall}),
             write_sample_run(root, "graddiff", 1, 0.4, quant_recall=recall)]
    runs = [load_run(p.name, root) for p in paths]
    doc = reviewer_report(runs)
    text = text_of(doc)
    assert "PTQ-gap matrix: nf4-grid base" in text and "| method |" not in text
    assert re.search(r"graddiff \+0\.500 \[\+0\.\d+, \+0\.\d+\] \+0\.400", text)
    assert "nf4 brings forgotten answers back (interval above 0) for graddiff (+0.500)" in text
    assert "int8 brings none back for any method" in text
    single = text_of(reviewer_report(runs[:1]))
    assert "PTQ-gap matrix" not in single
