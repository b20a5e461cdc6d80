"""fp4: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), blocksize 64, bit-exact with
bitsandbytes 0.50 on CPU tensors (`bitsandbytes/backends/default/ops.py`, kernel ``quantize_4bit``; the CPU
backend has its own kernel only for dequantize, which agrees with the table below: tested).

bitsandbytes' default `bnb_4bit_quant_type`, the one the SURE paper's public code evaluates with.  Same blockwise
absmax and scaling as nf4 (mansu.quant.nf4: s = x * fl(1/a_b) on full blocks, x / a_b on a partial last block),
with the code table in bit-pattern order

    code k:   0    1       2    3    4    5    6    7    8    9        10    11  12    13    14    15
    value:    0  1/192   2/3    1   1/3  1/2  1/6  1/4   0  -1/192  -2/3   -1  -1/3  -1/2  -1/6  -1/4

(fp32: get_4bit_type('fp4') = [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12).  bitsandbytes sorts the table
(torch.argsort on the CPU gives ORDER below; the two zeros tie and it puts code 0 before code 8), takes the fp32
midpoints t_p of adjacent sorted values and stores code = ORDER[#{p : t_p < s}] (a tie goes to the lower value).
t_7 = 0 separates the two zero codes: s <= 0 near zero stores code 0, 0 < s <= t_8 stores code 8; both
dequantize to +0.0.  The geometry merges them into one level (see mansu.quant.base: "code" versus "level"), so
there are 15 levels and 14 thresholds, and the zero cell is (-1/384, +1/384] * a_b.

Bin widths in units of a_b (the same for negative levels): 1/192 = 0.0052 for the zero cell, 0.083 for levels
1/192 and 1/4, 0.122 for 1/6, 0.125 for 1/3, 0.167 for 1/2 and for the edge cell of 1 (ending at a_b), 0.25
for 2/3.  Scale caps: -a_b, +a_b; the absmax elements are frozen.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from mansu.quant.base import ElementGrid, Quantized, Quantizer
from mansu.quant.nf4 import (
    DEFAULT_BLOCKSIZE,
    block_absmax,
    chunk_step,
    run_chunks,
    scale_by_block,
    validate_weight,
)
from mansu.quant.quantizers.nf4 import absmax_grid, scaled_fixed

FP4_CODE: tuple[float, ...] = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
    -0.25,
)  # bitsandbytes get_4bit_type("fp4"), in code (bit-pattern) order
ORDER: tuple[int, ...] = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)  # ascending values; 0 before 8
ZERO_SPLIT = 7  # sorted position of the threshold between the two zero codes (t_7 = 0)


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 fp4 values in code order, fp32 [16]."""
    return torch.tensor(FP4_CODE, dtype=torch.float32, device=device)


def fp4_thresholds(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' 15 fp32 midpoints of adjacent sorted values (t_7 = 0 splits the two zeros), fp32 [15]."""
    v = fp4_code(device)[torch.tensor(ORDER, device=device)]
    return (v[:-1] + v[1:]) / 2


def level_thresholds(device: torch.device | str | None = None) -> torch.Tensor:
    """The 14 thresholds between the 15 distinct levels (t_7 = 0 removed), fp32 [14]."""
    t = fp4_thresholds(device)
    return torch.cat([t[:ZERO_SPLIT], t[ZERO_SPLIT + 1:]])


def level_values(device: torch.device | str | None = None) -> torch.Tensor:
    """The 15 distinct levels, ascending, fp32 [15]."""
    v = fp4_code(device)[torch.tensor(ORDER, device=device)]
    return torch.cat([v[:ZERO_SPLIT], v[ZERO_SPLIT + 1:]])


_LUT_CELLS = 2048  # cells of [-1, 1], 0.00098 wide: below the smallest threshold gap (1/384 = 0.0026)
_LUT_SLOP = 1e-4  # >> fp32 rounding of the cell index, and cell + slop < the smallest gap


@functools.lru_cache(maxsize=8)
def _code_lut(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, thr, order) per cell j of [-1, 1]: the sorted position is base_j + [s > thr_j] (at most one
    threshold lies in a cell; same construction as mansu.quant.nf4._code_lut), then code = order[position]."""
    t = fp4_thresholds()
    lo = torch.arange(_LUT_CELLS, dtype=torch.float64) * (2 / _LUT_CELLS) - 1
    base = (t.double()[None, :] < (lo[:, None] - _LUT_SLOP)).sum(1)
    thr = torch.cat([t, torch.tensor([float("inf")])])[base]
    order = torch.tensor(ORDER, dtype=torch.uint8)
    return base.to(device=device, dtype=torch.int32), thr.to(device), order.to(device)


def sorted_positions(s: torch.Tensor) -> torch.Tensor:
    """bucketize(s, fp4_thresholds(), right=False) of scaled values s (fp32), int32, by table lookup."""
    base, thr, _ = _code_lut(str(s.device))
    half = _LUT_CELLS / 2
    idx = torch.mul(s, half).add_(half).to(torch.int32).clamp_(0, _LUT_CELLS - 1)
    pos = torch.index_select(base, 0, idx)
    pos += torch.gt(s, torch.index_select(thr, 0, idx))
    return pos


def codes_from_scaled(s: torch.Tensor) -> torch.Tensor:
    """Stored fp4 codes of scaled values s (fp32), uint8: ORDER[bucketize(s, fp4_thresholds(), right=False)]."""
    return torch.index_select(_code_lut(str(s.device))[2], 0, sorted_positions(s))


def quantize_fp4_flat(x: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, *,
                      name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax fp32 [blocks]) of x, in block-aligned chunks over the thread pool (as
    mansu.quant.nf4.quantize_flat; temporaries ~12 B per element of a 32k chunk, outputs 1 + 4/blocksize B per
    weight)."""
    validate_weight(x, name, blocksize, check_finite=False)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    step = chunk_step(blocksize, n, flat.device)

    def work(start: int) -> bool:
        xc = flat[start:min(start + step, n)]
        if not bool(torch.isfinite(xc).all()):
            return False
        a = block_absmax(xc, blocksize)
        absmax[start // blocksize : start // blocksize + a.numel()] = a
        codes[start:start + xc.numel()] = codes_from_scaled(scale_by_block(xc, a, blocksize))
        return True

    if not all(run_chunks(work, range(0, n, step))):
        validate_weight(x, name, blocksize)  # raises with the NaN / Inf counts
    return codes, absmax


class FP4(Quantizer):
    name: ClassVar[str] = "fp4"
    group_size: ClassVar[int] = DEFAULT_BLOCKSIZE
    symmetric: ClassVar[bool] = True
    library: ClassVar[str] = "bitsandbytes.functional.quantize_4bit(quant_type='fp4', blocksize=64)"
    description: ClassVar[str] = "bitsandbytes FP4 (E2M1, bitsandbytes' default 4-bit type), absmax, blocksize 64"
    brackets: ClassVar[tuple[float, ...]] = (0.0,)  # the level is decided on fp32 s: a few grid steps suffice

    def quantize(self, w: torch.Tensor, *, name: str = "tensor") -> Quantized:
        codes, absmax = quantize_fp4_flat(w, self.group_size, name=name)
        return Quantized(codes.reshape(w.shape), absmax, None, tuple(w.shape), w.dtype, self.name)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        """deq = fl32(code_value * a_b), cast to the weight's dtype (bitsandbytes' CPU kernel)."""
        vals = fp4_code(q.codes.device)[q.codes.reshape(-1).long()]
        a = q.scales.repeat_interleave(self.group_size)[: q.numel]
        return (vals * a).to(q.dtype).reshape(q.shape)

    def element_grid(self, w: torch.Tensor, q: Quantized) -> ElementGrid:
        return absmax_grid(q.scales, q.numel, self.group_size)

    def level_of(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """#{level thresholds < s} (= bucketize over the 14 level thresholds): the sorted position, with the two
        zeros merged."""
        pos = sorted_positions(scaled_fixed(x, params)).long()
        return pos - (pos > ZERO_SPLIT).long()

    def cell_bounds_flat(self, q: Quantized, grid: ElementGrid) -> tuple[torch.Tensor, torch.Tensor]:
        t = level_thresholds(q.codes.device)
        one = torch.ones(1, device=t.device)
        lo, hi = torch.cat([-one, t]), torch.cat([t, one])
        m = _level_of_code(str(q.codes.device))[q.codes.reshape(-1).long()]
        return lo[m] * grid.cap_hi, hi[m] * grid.cap_hi


@functools.lru_cache(maxsize=8)
def _level_of_code(device: str = "cpu") -> torch.Tensor:
    """int64 [16]: the level (0..14) of each stored code; codes 0 and 8 (the two zeros) share level 7."""
    pos = torch.arange(16)
    table = torch.empty(16, dtype=torch.long)
    table[torch.tensor(ORDER)] = pos - (pos > ZERO_SPLIT).long()
    return table.to(device)
