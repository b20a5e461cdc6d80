"""Per-parameter NF4 geometry: each weight's code, its cell in weight units, its bin width, its distance to the
decision boundaries, whether it is its block's absmax, and the exact smallest move that changes its code.

Notation (see mansu/quant/nf4.py): block b of `blocksize` consecutive flat elements has absmax a_b; levels
L_0 < ... < L_15; fp32 thresholds t_k = (L_k + L_{k+1}) / 2, k = 0..14; code c_i = #{k : t_k < s_i} with
s_i = x_i / a_b (bitsandbytes' rounding).  In scaled units the cell of code k is (T^-_k, T^+_k] with

    T^-_k = t_{k-1} for k >= 1,   T^-_0  = -1      (edge cells end at the representable range |s| <= 1: with
    T^+_k = t_k     for k <= 14,  T^+_15 = +1       the absmax fixed no weight of the block gets beyond it)

and in weight units (everything fp32):

    lower_i     = T^-_{c_i} * a_b             upper_i   = T^+_{c_i} * a_b
    bin_width_i = (T^+_{c_i} - T^-_{c_i}) * a_b                       (= upper_i - lower_i up to fp32 rounding)
    dist_down_i = x_i - lower_i  (>= 0)       dist_up_i = upper_i - x_i  (>= 0)
    level_i     = L_{c_i} * a_b               (the dequantized value)
    is_absmax_i = |x_i| == a_b                (every tied element is flagged; all elements of an all-zero block)

so lower_i < x_i <= upper_i, except that the edge cell 0 is closed below (x_i = -a_b has code 0).

The widths range from 0.080 a_b (codes 7, 8: around zero) to 0.170 a_b (code 1), 0.152 a_b / 0.139 a_b for the
edge cells 0 / 15.  An all-zero block has a_b = 0 and width 0.

Absmax changes.  Everything above holds for a fixed a_b.  An update that changes a block's absmax (moves the
absmax element, or moves another element beyond |x| = a_b) rescales every s_i of the block by a_b / a_b', so
every code of the block may change, with no single weight crossing "its" boundary.  `min_move_to_change_code`
therefore answers for a fixed absmax and returns inf for the absmax elements and for moves that cannot change
the code without changing the absmax (code 15 upwards, code 0 downwards).

Exact boundaries.  t_k * a_b is only the real-number boundary; the code is decided on s = fl(x * fl(1/a_b))
(fl(x / a_b) in a partial last block).  `min_move_to_change_code` searches the weight dtype's grid so that
w + direction * move (computed in that dtype or wider) has a different code, and the representable weight just
before it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mansu.quant.nf4 import (
    ABSMAX_FLOOR,
    DEFAULT_BLOCKSIZE,
    NF4Quantized,
    cell_widths_scaled,
    nf4_levels,
    nf4_thresholds,
    quantize_flat,
    quantize_nf4,
    validate_weight,
)

Direction = Literal[1, -1]
_MAX_REFINE_STEPS = 64  # the fp32 estimate t * a is within a few ulps of the exact boundary


def cell_bounds_scaled(device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^-, T^+) per code, fp32 [16] each, in scaled units (edge cells end at -1 / +1)."""
    t = nf4_thresholds(device)
    one = torch.ones(1, device=device)
    return torch.cat([-one, t]), torch.cat([t, one])


@dataclass(frozen=True)
class NF4Geometry:
    """Per-element geometry, every tensor shaped like the weight (see the module docstring for definitions)."""

    codes: torch.Tensor  # uint8
    absmax: torch.Tensor  # fp32, the block absmax a_b of each element
    level: torch.Tensor  # fp32, L[c] * a_b
    lower: torch.Tensor  # fp32
    upper: torch.Tensor  # fp32
    bin_width: torch.Tensor  # fp32
    dist_down: torch.Tensor  # fp32
    dist_up: torch.Tensor  # fp32
    is_absmax: torch.Tensor  # bool
    blocksize: int


def element_absmax(q: NF4Quantized) -> torch.Tensor:
    """The block absmax of every element, fp32 [n] (flat)."""
    return q.absmax.repeat_interleave(q.blocksize)[: q.numel]


def nf4_geometry(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, *, name: str = "tensor") -> NF4Geometry:
    """The full per-element geometry of `w` (fp32/bf16/fp16) under blockwise NF4."""
    q = quantize_nf4(w, blocksize, name=name)
    x = w.detach().reshape(-1).float()
    a = element_absmax(q)
    c = q.codes.long()
    dev = c.device
    lo, hi = cell_bounds_scaled(dev)
    lower, upper = lo[c] * a, hi[c] * a
    shape = tuple(w.shape)
    return NF4Geometry(
        codes=q.codes.reshape(shape), absmax=a.reshape(shape), level=(nf4_levels(dev)[c] * a).reshape(shape),
        lower=lower.reshape(shape), upper=upper.reshape(shape),
        bin_width=(cell_widths_scaled(dev)[c] * a).reshape(shape),
        dist_down=(x - lower).reshape(shape), dist_up=(upper - x).reshape(shape),
        is_absmax=(x.abs() == a).reshape(shape), blocksize=blocksize,
    )


def quantize_with_bin_width(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, *,
                            name: str = "tensor") -> tuple[NF4Quantized, torch.Tensor]:
    """NF4 codes plus each element's bin width (fp32, shaped like w), in one chunked pass (bounded memory)."""
    codes, absmax, width = quantize_flat(w, blocksize, name=name, with_width=True)
    return NF4Quantized(codes, absmax, tuple(w.shape), w.dtype, blocksize), width.reshape(w.shape)


def bin_width(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, *, name: str = "tensor") -> torch.Tensor:
    """Each element's NF4 bin width in weight units, fp32 shaped like w."""
    return quantize_with_bin_width(w, blocksize, name=name)[1]


def _scaled_fn(q: NF4Quantized):
    """s(x) for candidate flat weights x, with each element's own block absmax and rounding rule (fixed absmax)."""
    a = element_absmax(q)
    recip = 1.0 / a.clamp(min=ABSMAX_FLOOR)
    n_full = q.numel - q.numel % q.blocksize
    in_partial = torch.arange(q.numel, device=a.device) >= n_full
    a_floor = a.clamp(min=ABSMAX_FLOOR)

    def scaled(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return torch.where(in_partial, xf / a_floor, xf * recip)

    return scaled, a


def min_move_to_change_code(w: torch.Tensor, direction: Direction, blocksize: int = DEFAULT_BLOCKSIZE, *,
                            name: str = "tensor") -> torch.Tensor:
    """Per element, the smallest move m >= 0 such that w + direction * m (in w's dtype grid) has a different NF4
    code with the block absmax unchanged; inf for absmax elements and where impossible (code 15 up, code 0 down).

    Returned as fp32 shaped like w, rounded up so that fl(w + direction * m) reaches the first representable
    weight w' with a new code (rounding is monotone), while the representable weight before w' keeps the code.
    """
    target, feasible = code_change_target(w, direction, blocksize, name=name)
    move = (target.double() - w.detach().double()).abs().masked_fill(~feasible, 0.0)
    out = move.float()
    out = torch.where(out.double() < move, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
    return out.masked_fill(~feasible, float("inf"))


def code_change_target(w: torch.Tensor, direction: Direction, blocksize: int = DEFAULT_BLOCKSIZE, *,
                       name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(target, feasible): target is the first weight on w's dtype grid, going in `direction`, whose NF4 code
    differs from w's (it is code +- 1), with the block absmax fixed; where not feasible (absmax elements, code 15
    up, code 0 down) target == w.  Both shaped like w; target has w's dtype."""
    if direction not in (1, -1):
        raise ValueError(f"{name}: direction must be 1 (up) or -1 (down), got {direction!r}")
    validate_weight(w, name, blocksize)
    q = quantize_nf4(w, blocksize, name=name)
    x = w.detach().reshape(-1)
    scaled, a = _scaled_fn(q)
    c = q.codes.long()
    feasible = (x.float().abs() != a) & ((c < 15) if direction == 1 else (c > 0))
    t = nf4_thresholds(c.device)[(c if direction == 1 else c - 1).clamp(0, 14)]
    target = _first_crossing(x, t, a, scaled, direction, feasible)
    return target.reshape(w.shape), feasible.reshape(w.shape)


def _first_crossing(x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, scaled, direction: int,
                    feasible: torch.Tensor) -> torch.Tensor:
    """The first weight on x's dtype grid, going in `direction` from x, whose scaled value is past threshold t
    (s > t going up, s <= t going down).  Infeasible elements return x itself."""
    up, down = torch.full_like(x, float("inf")), torch.full_like(x, float("-inf"))
    ahead, back = (up, down) if direction == 1 else (down, up)

    def crossed(v: torch.Tensor) -> torch.Tensor:
        s = scaled(v)
        return (s > t) if direction == 1 else (s <= t)

    cand = torch.where(feasible, (t.double() * a.double()).to(x.dtype), x)
    for _ in range(_MAX_REFINE_STEPS):  # step forward until crossed
        need = feasible & ~crossed(cand)
        if not bool(need.any()):
            break
        cand = torch.where(need, torch.nextafter(cand, ahead), cand)
    for _ in range(_MAX_REFINE_STEPS):  # step back while the previous weight is crossed too
        prev = torch.nextafter(cand, back)
        need = feasible & crossed(prev)
        if not bool(need.any()):
            break
        cand = torch.where(need, prev, cand)
    if bool((feasible & ~crossed(cand)).any()) or bool((feasible & crossed(torch.nextafter(cand, back))).any()):
        raise RuntimeError("min_move_to_change_code: boundary search did not converge")  # a bug, not user input
    return cand
