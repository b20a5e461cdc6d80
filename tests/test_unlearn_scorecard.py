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


def _metrics(bf=1.0, uf=0.6, br=0.99, ur=0.97, gap=-0.01, chance=0.25, bf_low=None):
    def acc(f, r):
        return {"forget": {"accuracy": f, "chance": chance, "ci_low": f if bf_low is None else bf_low},
                "retain": {"accuracy": r, "chance": chance}}
    return {"base_fp": acc(bf, br), "unlearned_fp": acc(uf, ur),
            "ptq_gap": {"forget": {"gap": gap, "ci_low": gap - 0.01, "ci_high": gap + 0.01}}}


def _parts(moved: float) -> dict:
    return {"shrinkage": {"value": 0.3, "ci_low": 0.25, "ci_high": 0.35},
            "redistribution": {"value": moved, "ci_low": moved - 0.05, "ci_high": moved + 0.05},
            "outside_shift": {"value": 0.0, "ci_low": -0.05, "ci_high": 0.05},
            "moved_beyond_noise": {"value": moved, "ci_low": moved - 0.05, "ci_high": moved + 0.05}}


CAD = {"after_nf4": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "parts": _parts(0.5)}, "after_fp": {"value": 0.45}}


def test_all_four_pass_with_margins_relative_to_chance():
    card = build_scorecard(_metrics(), CAD)
    p = card["properties"]
    assert card["all_pass"] and card["n_pass"] == 4 and not card["nothing_to_forget"]
    assert p["forgetting"]["value"] == pytest.approx(0.4 / 0.75) and p["forgetting"]["drop"] == pytest.approx(0.4)
    assert p["forgetting"]["margin"] == pytest.approx(0.4 / 0.75 - 0.5)
    assert p["retain"]["value"] == pytest.approx(0.02 / 0.74) and p["retain"]["margin"] == pytest.approx(
        0.05 - 0.02 / 0.74)
    assert p["ptq_gap"]["tested"] == pytest.approx(0.0) and p["ptq_gap"]["margin"] == pytest.approx(0.05)
    assert not p["ptq_gap"]["recovery_significant"]
    assert p["structural_erasure"]["margin"] == pytest.approx(0.1) and p["structural_erasure"]["cad_fp"] == 0.45
    assert "PASS" in format_scorecard(card)


def test_the_same_knowledge_removed_means_the_same_on_4_and_5_choices():
    # a base at 1.0 that forgets down to chance + half its headroom: drop 0.375 on 4 choices, 0.4 on 5
    four = build_scorecard(_metrics(uf=0.625, chance=0.25), CAD)["properties"]["forgetting"]
    five = build_scorecard(_metrics(uf=0.6, chance=0.2), CAD)["properties"]["forgetting"]
    assert four["value"] == five["value"] == 0.5 and four["pass"] and five["pass"]
    assert not build_scorecard(_metrics(uf=0.625, chance=0.2), CAD)["properties"]["forgetting"]["pass"]


def test_ptq_gap_passes_on_its_ci_high_end_not_its_point_estimate():
    noisy = _metrics()
    noisy["ptq_gap"]["forget"] = {"gap": 0.0, "ci_low": -0.05, "ci_high": 0.06}    # a zero gap, wide CI
    p = build_scorecard(noisy, CAD)["properties"]["ptq_gap"]
    assert p["value"] == 0.0 and p["tested"] == pytest.approx(0.08) and not p["pass"]
    noisy["ptq_gap"]["forget"]["ci_high"] = 0.0375                                 # 5% of the 0.75 headroom
    assert build_scorecard(noisy, CAD)["properties"]["ptq_gap"]["pass"]


def test_a_base_at_chance_has_nothing_to_forget():
    # a random model: forget 0.25 -> 0.0 "passed" the old scorecard; now three properties are not scored
    card = build_scorecard(_metrics(bf=0.25, uf=0.0, br=0.9, ur=0.9), CAD)
    p = card["properties"]
    assert card["nothing_to_forget"] and "0.625" in card["reason"] and not card["all_pass"]
    assert [p[k]["status"] for k in ("forgetting", "ptq_gap", "structural_erasure")] == ["nothing to forget"] * 3
    assert p["retain"]["status"] == "pass" and card["n_pass"] == 1
    assert "NOTHING TO FORGET" in format_scorecard(card)
    # the CI's low end decides: a point of 0.7 whose CI reaches down to 0.6 is not well above chance
    assert build_scorecard(_metrics(bf=0.7, bf_low=0.6, uf=0.3), CAD)["nothing_to_forget"]
    assert not build_scorecard(_metrics(bf=0.7, bf_low=0.65, uf=0.3), CAD)["nothing_to_forget"]


def test_erasure_needs_attribution_that_moved_not_just_shrank():
    shrank = {**CAD, "after_nf4": {**CAD["after_nf4"], "parts": _parts(0.1)}}
    p = build_scorecard(_metrics(), shrank)["properties"]["structural_erasure"]
    assert p["status"] == "fail" and "did not move" in p["reason"] and p["moved_beyond_noise"]["value"] == 0.1
    assert p["cad_passes"] is True            # SPEC's reading (CAD alone) passes; compare shows it beside the rule
    card = build_scorecard(_metrics(), shrank)
    from mansu.commands.compare import _all_pass_cad_alone
    assert not card["all_pass"] and _all_pass_cad_alone(card) is True   # the other three pass here
    assert _all_pass_cad_alone(build_scorecard(_metrics(uf=0.9), shrank)) is False   # forgetting fails
    old = {**CAD, "after_nf4": {k: v for k, v in CAD["after_nf4"].items() if k != "parts"}}
    p = build_scorecard(_metrics(), old)["properties"]["structural_erasure"]
    assert p["status"] == "not available" and "predates the CAD split" in p["reason"]
    raw_only = {**CAD, "after_nf4": {**CAD["after_nf4"], "parts": {k: v for k, v in _parts(0.5).items()
                                                                  if k != "moved_beyond_noise"}}}
    p = build_scorecard(_metrics(), raw_only)["properties"]["structural_erasure"]   # raw redistribution is not read
    assert p["status"] == "not available" and "noise-corrected" in p["reason"]
    low_ci = {**CAD, "after_nf4": {**CAD["after_nf4"], "ci_low": 0.25}}          # CAD 0.5 but its CI reaches 0.25
    assert not build_scorecard(_metrics(), low_ci)["properties"]["structural_erasure"]["pass"]


def test_erasure_reads_the_per_fact_cad_when_cad_json_has_it():
    fact = {"cad": {"value": 0.5, "ci_low": 0.28, "ci_high": 0.6}}          # pooled passes, per fact does not
    card = {**CAD, "after_nf4": {**CAD["after_nf4"], "per_fact": fact}}
    p = build_scorecard(_metrics(), card)["properties"]["structural_erasure"]
    assert not p["pass"] and p["estimator"] == "per fact" and p["tested"] == 0.28 and p["cad_pooled"] == 0.5
    fact["cad"]["ci_low"] = 0.45
    p = build_scorecard(_metrics(), card)["properties"]["structural_erasure"]
    assert p["pass"] and p["tested"] == 0.45 and p["cad_pooled_ci_low"] == 0.4
    assert build_scorecard(_metrics(), CAD)["properties"]["structural_erasure"]["estimator"].startswith("pooled")


def test_each_property_can_fail_and_missing_cad_is_not_a_pass():
    card = build_scorecard(_metrics(uf=0.9, ur=0.8, gap=0.3), None)
    p = card["properties"]
    assert [p[k]["pass"] for k in ("forgetting", "retain", "ptq_gap")] == [False, False, False]
    assert p["ptq_gap"]["recovery_significant"]
    assert p["structural_erasure"]["status"] == "not available" and not p["structural_erasure"]["pass"]
    assert card["n_pass"] == 0 and "n/a" in format_scorecard(card)


def test_thresholds_are_configurable_and_validated():
    card = build_scorecard(_metrics(uf=0.9), None, ScorecardConfig(forget_margin=0.1))
    assert card["properties"]["forgetting"]["pass"]
    for name in ("forget_margin", "reroute_threshold", "min_base_above_chance"):
        with pytest.raises(ValueError, match=name):
            ScorecardConfig(**{name: 2.0})


@pytest.mark.parametrize("bf, uf, br, ur, c", [
    (1.0, 0.625, 1.0, 0.9625, 0.25),   # 0.375 / 0.75 = 0.5 and 0.0375 / 0.75 = 0.05, in exact arithmetic
    (0.7, 0.45, 0.7, 0.675, 0.2),      # 0.25 / 0.5 and 0.025 / 0.5
    (0.85, 0.55, 0.85, 0.82, 0.25),    # 0.3 / 0.6 and 0.03 / 0.6
])
def test_ties_on_the_thresholds_pass_despite_float_rounding(bf, uf, br, ur, c):
    raw = ((bf - uf) / (bf - c), (br - ur) / (br - c))
    assert raw != (0.5, 0.05)  # the float noise this guards against is really there
    p = build_scorecard(_metrics(bf=bf, uf=uf, br=br, ur=ur, chance=c), None)["properties"]
    assert p["forgetting"]["pass"] and p["forgetting"]["value"] == 0.5 and p["forgetting"]["margin"] == 0.0
    assert p["retain"]["pass"] and p["retain"]["value"] == 0.05 and p["retain"]["margin"] == 0.0


def test_one_example_past_a_threshold_still_fails():
    p = build_scorecard(_metrics(bf=1.0, uf=76 / 120, br=1.0, ur=113 / 120), None)["properties"]
    assert not p["forgetting"]["pass"] and p["forgetting"]["margin"] == pytest.approx(-1 / 90, abs=1e-9)
    assert not p["retain"]["pass"] and p["retain"]["margin"] == pytest.approx(0.05 - 7 / 90, abs=1e-9)
    assert TOLERANCE < 1e-6 < 1 / 120


def test_scorecard_file_has_one_writer_and_one_typed_reader(tmp_path):
    card = build_scorecard(_metrics(), CAD)
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
                              attribution_records=4, ig_steps=2, model_seeds="paired")
    jobs = plan(args)
    assert jobs[:3] == [("nf4-grid", "mansu", 0, 0), ("nf4-grid", "ga", 0, 0), ("natural", "mansu", 0, 0)]
    assert len(jobs) == 6
    with pytest.raises(ValueError, match="unknown method"):
        plan(argparse.Namespace(**{**vars(args), "methods": "mansu,magic"}))
    row = {"run_id": "r", "method": "mansu", "seed": 0, "base": "nf4-grid", "forget_fp": 0.5, "forget_nf4": 0.5,
           "ptq_gap": 0.0, "retain_fp": 0.9, "cad_nf4": 0.4, "median_ratio": 1.0, "params_touched": 10,
           "wall_seconds": 1.0, "all_pass": True, "pass": {k: True for k in
                                                           ("forgetting", "retain", "ptq_gap", "structural_erasure")}}
    text = render([row, {**row, "seed": 1, "forget_fp": 0.7}], {"nf4-grid": type("C", (), {"metrics": {}})()},
                  {}, 60.0, args)
    assert "| mansu | 0.600 ± 0.141 |" in text and "depend on that alignment" in text and "2/2" in text
    assert "| mansu | 2/2 | 2/2 | 2/2 | 2/2 | 0/2 |" in text      # no all_pass_cad_alone recorded: counted as not
