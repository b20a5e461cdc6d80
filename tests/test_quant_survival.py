"""Survival analysis of an update under NF4, and the grid-alignment diagnostic."""

from __future__ import annotations

import math

import pytest
import torch

import mansu.quant.survival as survival
from mansu.quant.geometry import bin_width, min_move_to_change_code, nf4_geometry
from mansu.quant.nf4 import nf4_round_trip
from mansu.quant.survival import (
    HIST_BINS,
    alignment_report,
    layer_of,
    load_survival,
    survival_analysis,
    write_survival,
)

F = pytest.importorskip("bitsandbytes.functional")


def bnb_round_trip(w: torch.Tensor) -> torch.Tensor:
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return F.dequantize_4bit(packed, state, quant_type="nf4").reshape(w.shape)


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(512, 512) * 0.02


@pytest.mark.parametrize("r", [0.1, 0.01])
def test_coherent_sub_bin_update_is_kept_in_expectation(weights, r):
    """SPEC: a coherent update of r bins flips about a fraction r of codes and keeps its mean (dither)."""
    torch.manual_seed(1)
    delta = -r * bin_width(weights) * torch.sign(torch.randn(1, 512))
    rep = survival_analysis({"m.layers.0.q.weight": weights}, {"m.layers.0.q.weight": weights + delta})
    o = rep["overall"]
    assert o["n_updated"] == weights.numel()
    assert o["median_ratio"] == pytest.approx(r, rel=1e-4)
    assert o["times_below_bin"] == pytest.approx(1 / r, rel=1e-4)
    assert o["frac_code_changed"] == pytest.approx(r, rel=0.25)
    assert 0.85 < o["kept_fraction"] < 1.15
    # per output row (fan-in 512) the signal-to-noise is about sqrt(d r) (SPEC table: 5.6 at r=0.1, 1.8 at 0.01)
    assert o["row_snr_median"] == pytest.approx(math.sqrt(512 * r), rel=0.5)
    assert o["snr"] > o["row_snr_median"] * 10  # the whole tensor pools 512 rows: ~sqrt(512) higher
    assert "below the NF4 bin width" in rep["headline"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_match_a_direct_computation_with_bitsandbytes(dtype):
    """Every statistic against whole-tensor formulas on bnb's round trip; rows span chunks, a partial block ends."""
    gen = torch.Generator().manual_seed(2)
    w0 = (torch.randn(300, 130, generator=gen) * 0.02).to(dtype)
    w1 = (w0.float() + torch.randn(300, 130, generator=gen) * 3e-4).to(dtype)
    t = survival_analysis({"w": w0}, {"w": w1}, ["w"])["tensors"]["w"]
    q = (bnb_round_trip(w1).float() - bnb_round_trip(w0).float()).double()
    d = (w1.float() - w0.float()).double()
    kept = float((q * d).sum() / (d * d).sum())
    assert t["kept_fraction"] == pytest.approx(kept, rel=1e-4)
    e = q - kept * d
    assert t["snr"] == pytest.approx(kept / float(((d * d * e * e).sum()).sqrt() / (d * d).sum()), rel=1e-3)
    k_r = (q * d).sum(1) / (d * d).sum(1)
    e_r = q - k_r[:, None] * d
    snr_r = k_r / (((d * d * e_r * e_r).sum(1)).sqrt() / (d * d).sum(1))
    assert t["row_snr_median"] == pytest.approx(float(snr_r.float().median()), rel=1e-3)
    upd = d != 0
    assert t["n_updated"] == int(upd.sum())
    assert t["frac_dequant_changed"] == pytest.approx(float((q != 0)[upd].double().mean()), abs=1e-12)
    assert t["sign_agreement"] == pytest.approx(int((q * d > 0).sum()) / int(((q != 0) & upd).sum()), abs=1e-12)
    ratio = (d.abs() / bin_width(w0).double())[upd]
    assert t["median_ratio"] == pytest.approx(float(ratio.median()), rel=1e-3)


def test_grid_aligned_base_erases_a_sub_bin_update(weights):
    """On an NF4-grid base every update below half a bin rounds back: nothing changes code, nothing survives."""
    base = nf4_round_trip(weights)
    geo = nf4_geometry(base)
    delta = (-0.05 * geo.bin_width).masked_fill(geo.is_absmax, 0.0)  # keep every absmax fixed
    rep = survival_analysis({"w": base}, {"w": base + delta}, ["w"])
    o = rep["overall"]
    assert o["frac_code_changed"] == 0.0 and o["frac_dequant_changed"] == 0.0
    assert o["kept_fraction"] == 0.0
    assert o["n_updated"] == weights.numel() - int(geo.is_absmax.sum())


def test_floored_update_changes_every_code(weights):
    """Moving chosen weights by min_move_to_change_code (+ nothing) changes each of their codes."""
    move = min_move_to_change_code(weights, 1)
    pick = torch.isfinite(move) & (torch.rand(weights.shape, generator=torch.Generator().manual_seed(3)) < 0.01)
    w1 = torch.where(pick, weights + move, weights)
    o = survival_analysis({"w": weights}, {"w": w1}, ["w"])["overall"]
    assert o["n_updated"] == int(pick.sum())
    assert o["frac_code_changed"] == 1.0 and o["sign_agreement"] == 1.0
    assert o["n_code_changed_not_updated"] == 0
    assert o["kept_fraction"] > 1.0  # each changed code moves to the next level: beyond the boundary-crossing move


def test_pooling_histograms_json_round_trip(tmp_path):
    torch.manual_seed(4)
    theta = {f"model.layers.{i}.mlp.{n}.weight": torch.randn(64, 128) * 0.02 for i in range(2) for n in ("up", "down")}
    theta["lm_head.weight"] = torch.randn(64, 128)
    new = {k: v + torch.randn_like(v) * 1e-3 * (k != "model.layers.1.mlp.up.weight") for k, v in theta.items()}
    names = [k for k in theta if k != "lm_head.weight"]
    rep = survival_analysis(theta, new, names)
    assert set(rep["tensors"]) == set(names) and set(rep["layers"]) == {"0", "1"}
    assert rep["tensors"]["model.layers.1.mlp.up.weight"]["n_updated"] == 0
    assert rep["tensors"]["model.layers.1.mlp.up.weight"]["kept_fraction"] is None
    o = rep["overall"]
    assert o["n_updated"] == sum(t["n_updated"] for t in rep["tensors"].values()) == 3 * 64 * 128
    assert len(o["histogram"]) == HIST_BINS + 2 and sum(o["histogram"]) == o["n_updated"]
    assert o["histogram"] == [sum(c) for c in zip(*(t["histogram"] for t in rep["tensors"].values()))]
    assert len(rep["histogram_edges"]) == HIST_BINS + 1
    q = o["ratio_quantiles"]
    assert q["5"] <= q["25"] <= q["50"] <= q["75"] <= q["95"]
    path = tmp_path / "survival.json"
    write_survival(path, rep)
    back = load_survival(path)
    assert back["overall"]["kept_fraction"] == pytest.approx(o["kept_fraction"])
    assert back["_stamp"]["schema_version"] >= 1
    (tmp_path / "other.json").write_text('{"kind": "x"}')
    with pytest.raises(ValueError, match="not an NF4 survival report"):
        load_survival(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError):
        load_survival(tmp_path / "missing.json")


def test_quantiles_from_a_sample_beyond_the_cap(weights, monkeypatch):
    delta = torch.rand(weights.shape, generator=torch.Generator().manual_seed(5)) * bin_width(weights)
    exact = survival_analysis({"w": weights}, {"w": weights + delta}, ["w"])["overall"]
    monkeypatch.setattr(survival, "QUANTILE_SAMPLE", 20_000)
    sampled = survival_analysis({"w": weights}, {"w": weights + delta}, ["w"])["overall"]
    assert exact["ratio_quantiles_exact"] and not sampled["ratio_quantiles_exact"]
    assert sampled["median_ratio"] == pytest.approx(exact["median_ratio"], abs=0.02)
    assert sampled["histogram"] == exact["histogram"]  # histograms stay exact


def test_bad_inputs_name_the_tensor(weights):
    with pytest.raises(ValueError, match="missing.weight"):
        survival_analysis({"w": weights}, {"w": weights}, ["missing.weight"])
    with pytest.raises(ValueError, match="shape"):
        survival_analysis({"w": weights}, {"w": weights[:10]}, ["w"])
    with pytest.raises(ValueError, match="w: .*NaN"):
        bad = weights.clone()
        bad[0, 0] = float("nan")
        survival_analysis({"w": weights}, {"w": bad}, ["w"])
    with pytest.raises(ValueError, match="blocksize"):
        survival_analysis({"w": weights}, {"w": weights}, ["w"], blocksize=7)


def test_alignment_separates_natural_from_grid_aligned(weights):
    natural = alignment_report({"w": weights})["overall"]
    aligned = alignment_report({"w": nf4_round_trip(weights)})["overall"]
    geo = nf4_geometry(weights)
    halfway = alignment_report({"w": (weights + geo.level) / 2})["overall"]  # partially aligned
    assert 0.2 < natural["mean_distance"] < 0.3 and natural["frac_on_grid"] < 0.01
    assert aligned["frac_on_grid"] == 1.0 and aligned["mean_distance"] < 1e-4
    assert halfway["mean_distance"] == pytest.approx(natural["mean_distance"] / 2, rel=0.1)
    n_absmax = weights.numel() // 64  # excluded: one per block
    assert sum(natural["histogram"]) == natural["n_weights"] == weights.numel() - n_absmax


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "3"
    assert layer_of("lm_head.weight") == "other"
