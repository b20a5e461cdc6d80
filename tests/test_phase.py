"""The phase-diagram sweep (mansu.science.phase) on tiny synthetic layers reproduces the known endpoints of SPEC.md:
on a grid-aligned base NF4 undoes every sub-bin update (the reversal), on a natural base with a large fan-in it keeps
the update (a dither), with signal-to-noise ~ sqrt(d r); a half-aligned base brings back about half of the facts."""

from __future__ import annotations

import math

import pytest
import torch

from mansu.cli import main
from mansu.quant.alignment import aligned_view
from mansu.quant.registry import get_quantizer
from mansu.science.phase import (
    PhaseConfig,
    base_geometry,
    gaussian_gap,
    phase_sweep,
    predicted_gap,
    synthetic_layer,
    unlearning_update,
)


def sweep(**kw):
    return {(p.shape, p.fan_in, p.fraction, p.ratio): p for p in phase_sweep(PhaseConfig(**kw))}


def test_grid_base_undoes_every_sub_bin_update_and_natural_large_fan_in_keeps_it():
    pts = sweep(fan_ins=(64, 1024), fractions=(0.0, 1.0), ratios=(0.003, 0.05), shapes=("sign",), n_out=128)
    for d in (64, 1024):
        for rho in (0.003, 0.05):
            grid = pts[("sign", d, 1.0, rho)]
            assert grid.gap == 1.0 and grid.frac_level_changed == 0.0  # NF4(base + delta) == NF4(base)
            assert grid.kept_pred == 0.0 and grid.gap_pred == 1.0
    natural = pts[("sign", 1024, 0.0, 0.05)]
    assert abs(natural.kept - 1.0) < 0.05  # kept in expectation: an unbiased dither
    assert natural.gap < 0.15 and natural.regime == "kept"
    assert abs(natural.gap - natural.gap_pred) < 0.05
    noisy = pts[("sign", 64, 0.0, 0.003)]  # d rho = 0.2: most units see no level change at all
    assert noisy.gap > 0.6 and abs(noisy.gap - noisy.gap_pred) < 0.15


def test_snr_grows_like_sqrt_fan_in_times_ratio_as_in_spec():
    """SPEC's table: coherent sign update, d = 512: snr 1.8 at r = 0.01 and 5.6 at r = 0.1 (~0.8 sqrt(d r))."""
    pts = sweep(fan_ins=(512,), fractions=(0.0,), ratios=(0.01, 0.1), shapes=("sign",), n_out=256)
    for rho, spec_snr in ((0.01, 1.8), (0.1, 5.6)):
        p = pts[("sign", 512, 0.0, rho)]
        assert 0.7 * spec_snr < p.snr < 1.3 * spec_snr
        assert 0.6 < p.snr / math.sqrt(512 * rho) < 1.1


def test_half_aligned_base_brings_back_about_half_of_the_facts():
    pts = sweep(fan_ins=(1024,), fractions=(0.5,), ratios=(0.02,), shapes=("gradient", "sign"), n_out=128)
    for shape in ("gradient", "sign"):
        p = pts[(shape, 1024, 0.5, 0.02)]
        assert 0.4 < p.gap < 0.62 and 0.4 < p.kept < 0.6
        assert 0.4 < p.kept_pred < 0.6


def test_update_has_the_asked_median_ratio_leaves_scales_alone_and_lowers_every_output():
    w, x = synthetic_layer(256, 64, seed=3)
    qz = get_quantizer("nf4")
    base = aligned_view(qz, w, 0.5, seed=3)
    geo = base_geometry(base, "nf4")
    for shape in ("gradient", "sign"):
        delta = unlearning_update(base, x, 0.07, geo, shape)
        ratio = (delta.abs() / geo.width)[geo.free]
        assert abs(float(ratio.median()) - 0.07) < 1e-3
        assert bool((delta[~geo.free] == 0).all())
        assert bool((delta @ x < 0).all())
        moved = base + delta
        assert torch.equal(qz.quantize(moved).scales, qz.quantize(base).scales)  # block absmax unchanged


def test_prediction_limits():
    assert predicted_gap(0.0, 4096, 0.1) == 1.0
    assert abs(predicted_gap(1.0, 64, 1e-4) - math.exp(-64e-4)) < 1e-3  # no level change: the fact is back
    for d, rho in ((4096, 0.05), (1024, 0.3)):  # large snr: the Gaussian limit
        assert abs(predicted_gap(1.0, d, rho) - gaussian_gap(1.0, d, rho)) < 2e-3
    assert abs(predicted_gap(0.5, 4096, 0.1) - 0.5) < 0.01


def test_bad_config_is_refused_with_what_is_accepted():
    with pytest.raises(ValueError, match="aligned fractions must lie in"):
        PhaseConfig(fractions=(1.5,))
    with pytest.raises(ValueError, match="choose among gradient, sign"):
        PhaseConfig(shapes=("adam",))
    with pytest.raises(ValueError, match="int4-g128 cannot quantize rows of fan-in"):
        PhaseConfig(fan_ins=(64,), quantizer="int4-g128")


def test_cli_writes_the_page_table_and_figure(tmp_path, capsys):
    out = tmp_path / "phase.md"
    rc = main(["sweep", "phase", "--out", str(out), "--fan-ins", "64", "--fractions", "0,1", "--ratios", "0.01,0.3",
               "--shapes", "sign", "--n-out", "32"])
    assert rc == 0
    text = out.read_text()
    assert "| rho | d = 64 |" in text and "## Reading your own model's regime" in text
    assert (tmp_path / "phase.png").stat().st_size > 10_000 and (tmp_path / "phase.svg").exists()
    assert (tmp_path / "phase.json").exists()
    assert main(["sweep", "phase", "--out", str(tmp_path / "x.txt")]) == 2
    assert "must be a markdown file" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_demo_step_rounds_back_on_the_grid_base_and_has_the_asked_median_on_the_natural_one(family):
    from mansu.quant.targets import quant_layout
    from mansu.science.phase_demo import _geometry, apply_step, base_kept_fraction, forget_gradient_sign
    from mansu.testing import tiny_model, toy_records, toy_tokenizer

    tok, model = toy_tokenizer(), tiny_model(family, hidden=64)
    signs = forget_gradient_sign(model, tok, toy_records(6))
    natural = {n: p.detach().clone() for n, p in model.named_parameters() if n in signs}
    qz, layout, params = get_quantizer("nf4"), quant_layout(model), dict(model.named_parameters())

    def views() -> dict[str, torch.Tensor]:
        return {n: layout.view(n, params[n].detach()).clone() for n in signs}

    apply_step(model, natural, signs, 1.0, 0.0)
    grid_base = views()
    assert base_kept_fraction(model, 0.05) == 0.0
    apply_step(model, natural, signs, 1.0, 0.05)
    for n, w in views().items():
        assert not torch.equal(w, grid_base[n])
        assert torch.equal(qz.round_trip(w), qz.round_trip(grid_base[n]))  # the reversal: NF4 sees the base

    apply_step(model, natural, signs, 0.0, 0.0)
    assert base_kept_fraction(model, 0.05) > 0.8
    nat = views()
    geo = {n: _geometry(qz, v) for n, v in nat.items()}
    apply_step(model, natural, signs, 0.0, 0.05)
    ratios = torch.cat([((w - nat[n]).abs() / geo[n][0])[geo[n][3]] for n, w in views().items()])
    assert abs(float(ratios.median()) - 0.05) < 2e-3
    for n, w in views().items():
        assert torch.equal(qz.quantize(w).scales, qz.quantize(nat[n]).scales)
