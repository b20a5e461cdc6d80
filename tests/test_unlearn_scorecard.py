"""Scorecard rules and margins; compare's plan and table rendering (pure functions, no model)."""

from __future__ import annotations

import argparse

import pytest

from mansu.scorecard import (
    TOLERANCE,
    ScorecardConfig,
    build_scorecard,
    format_scorecard,
    read_scorecard,
    write_scorecard,
)


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


@pytest.mark.parametrize("bf, uf, br, ur", [
    (1.0, 0.8, 1.0, 0.95),        # drop 1.0 - 0.8 = 0.19999999999999996, loss 1.0 - 0.95 = 0.050000000000000044
    (0.7, 0.5, 0.35, 0.3),        # 0.19999999999999996 and 0.04999999999999999
    (57 / 120, 33 / 120, 1.0, 0.95),  # counts over n = 120: 24/120 = 0.2 and 6/120 = 0.05
])
def test_ties_on_the_thresholds_pass_despite_float_rounding(bf, uf, br, ur):
    assert bf - uf != 0.2 or br - ur != 0.05  # the float noise this guards against is really there
    p = build_scorecard(_metrics(bf=bf, uf=uf, br=br, ur=ur), None)["properties"]
    assert p["forgetting"]["pass"] and p["forgetting"]["value"] == 0.2 and p["forgetting"]["margin"] == 0.0
    assert p["retain"]["pass"] and p["retain"]["value"] == 0.05 and p["retain"]["margin"] == 0.0


def test_one_example_past_a_threshold_still_fails():
    p = build_scorecard(_metrics(bf=1.0, uf=97 / 120, br=1.0, ur=113 / 120), None)["properties"]
    assert not p["forgetting"]["pass"] and p["forgetting"]["margin"] == pytest.approx(-1 / 120 + 0.0, abs=1e-3)
    assert not p["retain"]["pass"] and p["retain"]["margin"] == pytest.approx(-1 / 120 + 0.0, abs=1e-3)
    assert TOLERANCE < 1e-6 < 1 / 120


def test_scorecard_file_has_one_writer_and_one_typed_reader(tmp_path):
    card = build_scorecard(_metrics(), {"after_nf4": {"value": 0.5}})
    assert read_scorecard(tmp_path) is None
    write_scorecard(tmp_path, card)
    assert read_scorecard(tmp_path)["properties"] == card["properties"]
    with pytest.raises(ValueError, match=r"scorecard.json \(writing\): properties.retain.pass must be true or false"):
        write_scorecard(tmp_path, {**card, "properties": {"retain": {**card["properties"]["retain"], "pass": "yes"}}})
    (tmp_path / "scorecard.json").write_text('{"properties": {"speed": {}}, "all_pass": true}')
    with pytest.raises(ValueError, match=r"scorecard.json: unknown property 'speed'; accepted are forgetting, retain"):
        read_scorecard(tmp_path)
    (tmp_path / "scorecard.json").write_text('[]')
    with pytest.raises(ValueError, match=r"scorecard.json: expected a JSON object, got a JSON array"):
        read_scorecard(tmp_path)


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
