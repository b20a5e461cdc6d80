"""Scorecard rules and margins; compare's plan and table rendering (pure functions, no model)."""

from __future__ import annotations

import argparse

import pytest

from mansu.scorecard import ScorecardConfig, build_scorecard, format_scorecard


def _metrics(bf=1.0, uf=0.6, br=0.99, ur=0.97, gap=-0.01):
    acc = lambda f, r: {"forget": {"accuracy": f}, "retain": {"accuracy": r}}  # noqa: E731
    return {"base_fp": acc(bf, br), "unlearned_fp": acc(uf, ur),
            "ptq_gap": {"forget": {"gap": gap, "ci_low": gap - 0.05, "ci_high": gap + 0.05}}}


def test_all_four_pass_with_margins():
    card = build_scorecard(_metrics(), {"after_nf4": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6},
                                        "after_fp": {"value": 0.45}})
    p = card["properties"]
    assert card["all_pass"] and card["n_pass"] == 4
    assert p["forgetting"]["margin"] == pytest.approx(0.4 - 0.2)
    assert p["retain"]["margin"] == pytest.approx(0.05 - 0.02)
    assert p["ptq_gap"]["margin"] == pytest.approx(0.01) and not p["ptq_gap"]["recovery_significant"]
    assert p["structural_erasure"]["margin"] == pytest.approx(0.2) and p["structural_erasure"]["cad_fp"] == 0.45
    assert "PASS" in format_scorecard(card)


def test_each_property_can_fail_and_missing_cad_is_not_a_pass():
    card = build_scorecard(_metrics(uf=0.9, ur=0.8, gap=0.3), None)
    p = card["properties"]
    assert [p[k]["pass"] for k in ("forgetting", "retain", "ptq_gap")] == [False, False, False]
    assert p["ptq_gap"]["recovery_significant"]
    assert p["structural_erasure"]["status"] == "not available" and not p["structural_erasure"]["pass"]
    assert card["n_pass"] == 0 and "n/a" in format_scorecard(card)


def test_thresholds_are_configurable_and_validated():
    card = build_scorecard(_metrics(uf=0.9), None, ScorecardConfig(forget_margin=0.05))
    assert card["properties"]["forgetting"]["pass"]
    with pytest.raises(ValueError, match="forget_margin"):
        ScorecardConfig(forget_margin=2.0)


def test_compare_plan_is_seed_major_and_validates():
    from mansu.commands.compare import plan, render

    args = argparse.Namespace(seeds=2, methods="mansu,ga", natural_methods="mansu", retain_eval_limit=10,
                              attribution_records=4, ig_steps=2)
    jobs = plan(args)
    assert jobs[:3] == [("nf4-grid", "mansu", 0), ("nf4-grid", "ga", 0), ("natural", "mansu", 0)] and len(jobs) == 6
    with pytest.raises(ValueError, match="unknown method"):
        plan(argparse.Namespace(**{**vars(args), "methods": "mansu,magic"}))
    row = {"run_id": "r", "method": "mansu", "seed": 0, "base": "nf4-grid", "forget_fp": 0.5, "forget_nf4": 0.5,
           "ptq_gap": 0.0, "retain_fp": 0.9, "cad_nf4": 0.4, "median_ratio": 1.0, "params_touched": 10,
           "wall_seconds": 1.0, "all_pass": True, "pass": {k: True for k in
                                                           ("forgetting", "retain", "ptq_gap", "structural_erasure")}}
    text = render([row, {**row, "seed": 1, "forget_fp": 0.7}], {"nf4-grid": type("C", (), {"metrics": {}})()},
                  {}, 60.0, args)
    assert "| mansu | 0.600 ± 0.141 |" in text and "depend on that alignment" in text and "2/2" in text
