"""Per-parameter NF4 geometry: cells, bin widths, absmax flags, and the exact code-changing move, checked with
the real bitsandbytes quantizer."""

from __future__ import annotations

import pytest
import torch

from mansu.quant.geometry import (
    bin_width,
    cell_widths_scaled,
    code_change_target,
    min_move_to_change_code,
    nf4_geometry,
    quantize_with_bin_width,
)
from mansu.quant.nf4 import FLOAT_DTYPES, quantize_nf4, unpack_nf4

F = pytest.importorskip("bitsandbytes.functional")


def bnb_codes(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    packed, _ = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    return unpack_nf4(packed, x.numel()).long().reshape(x.shape)


def test_geometry_definitions_hold():
    torch.manual_seed(0)
    w = torch.randn(40, 70) * 0.02
    g = nf4_geometry(w, 64)
    q = quantize_nf4(w, 64)
    assert torch.equal(g.codes.reshape(-1), q.codes)
    # w sits in its cell (lower, upper]; the edge cell 0 is closed at -absmax
    assert (g.lower <= w).all() and (w <= g.upper).all() and (g.lower < w)[g.codes > 0].all()
    assert torch.allclose(g.bin_width, g.upper - g.lower, rtol=1e-6, atol=0)
    assert torch.allclose(g.dist_down + g.dist_up, g.bin_width, rtol=1e-5, atol=1e-12)
    assert (g.dist_down >= 0).all() and (g.dist_up >= 0).all()
    # one absmax per block (random data has no ties), and it sits in an edge cell
    assert int(g.is_absmax.sum()) == q.absmax.numel()
    assert set(g.codes[g.is_absmax].tolist()) <= {0, 15}
    # widths in units of absmax: narrowest around 0, widest at code 1
    widths = cell_widths_scaled()
    assert widths.argmin().item() in (7, 8) and widths.argmax().item() == 1
    assert torch.allclose(widths.sum(), torch.tensor(2.0))  # the cells tile [-1, 1]


def test_quantize_with_bin_width_matches_geometry_and_bitsandbytes():
    torch.manual_seed(1)
    w = torch.randn(4096 * 64 + 100) * 0.02  # more than one chunk, partial block
    q, width = quantize_with_bin_width(w, 64)
    assert torch.equal(q.codes.long(), bnb_codes(w, 64))
    assert torch.equal(width, nf4_geometry(w, 64).bin_width)
    assert torch.equal(bin_width(w, 64), width)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("direction", [1, -1])
def test_min_move_changes_the_code_and_less_does_not(dtype, blocksize, direction):
    torch.manual_seed(blocksize + direction)
    w = (torch.randn(37, 70) * 0.02).to(dtype)
    c0 = bnb_codes(w, blocksize)
    move = min_move_to_change_code(w, direction, blocksize)
    target, feasible = code_change_target(w, direction, blocksize)
    assert torch.equal(torch.isfinite(move), feasible)
    assert feasible.float().mean() > 0.9
    # infeasible: exactly the absmax elements and the edge codes in the blocked direction
    g = nf4_geometry(w, blocksize)
    edge = (g.codes == 15) if direction == 1 else (g.codes == 0)
    assert torch.equal(~feasible, g.is_absmax | edge)
    # the target weight has the neighbouring code; the representable weight before it keeps the old one
    c_target = bnb_codes(target, blocksize)
    assert torch.equal(c_target[feasible], c0[feasible] + direction)
    assert torch.equal(c_target[~feasible], c0[~feasible])
    before = torch.nextafter(target, torch.full_like(target, -direction * float("inf")))
    assert torch.equal(bnb_codes(torch.where(feasible, before, w), blocksize), c0)
    # applying the move in fp32 arithmetic changes the code
    moved = torch.where(feasible, (w.float() + direction * move).to(dtype), w)
    assert torch.equal(bnb_codes(moved, blocksize)[feasible], c0[feasible] + direction)
    # the move is the distance to the boundary, up to the dtype's spacing there; for fp32 0.999 of it is too short
    dist = (g.dist_up if direction == 1 else g.dist_down)[feasible]
    spacing = (torch.nextafter(target, torch.full_like(target, float("inf"))) - target).float().abs()[feasible]
    assert ((move[feasible] - dist).abs() <= 2 * spacing + 1e-6 * g.absmax[feasible]).all()
    if dtype == torch.float32:
        big = feasible & (move > 1e-3 * w.abs())
        shy = torch.where(big, w + direction * move * 0.999, w)
        assert torch.equal(bnb_codes(shy, blocksize), c0)


def test_min_move_on_all_zero_block_and_direction_validation():
    w = torch.zeros(64)
    assert torch.isinf(min_move_to_change_code(w, 1)).all()
    with pytest.raises(ValueError, match="direction"):
        min_move_to_change_code(torch.ones(4), 0)
    with pytest.raises(ValueError, match="w.q: .*NaN"):
        nf4_geometry(torch.tensor([float("nan"), 1.0]), name="w.q")
