"""nf4: bitsandbytes' 4-bit NormalFloat, blocksize 64, behind the Quantizer interface.

A thin wrapper over mansu.quant.nf4 (the bit-exact quantizer; its docstring has the equations) and
mansu.quant.geometry (cells, bin widths and the exact code-changing move, written for NF4 and tested there).
Grid: 16 levels L_k (NF4_LEVELS) times the block absmax a_b; code = #{k : t_k < x * fl(1/a_b)} with fp32
midpoints t_k (a tie goes to the lower level); bin width (T^+_c - T^-_c) * a_b, from 0.080 a_b around zero to
0.170 a_b; scale caps -a_b, +a_b (the absmax elements are frozen).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mansu.quant.base import Direction, ElementGrid, Quantized, Quantizer
from mansu.quant.geometry import bin_width, cell_bounds_scaled, code_change_target
from mansu.quant.nf4 import (
    ABSMAX_FLOOR,
    DEFAULT_BLOCKSIZE,
    NF4Quantized,
    codes_from_scaled,
    dequantize_nf4,
    quantize_nf4,
)


class NF4(Quantizer):
    name: ClassVar[str] = "nf4"
    group_size: ClassVar[int] = DEFAULT_BLOCKSIZE
    symmetric: ClassVar[bool] = True
    library: ClassVar[str] = "bitsandbytes.functional.quantize_4bit(quant_type='nf4', blocksize=64)"
    description: ClassVar[str] = "bitsandbytes NF4 (QLoRA), blockwise absmax, blocksize 64"
    brackets: ClassVar[tuple[float, ...]] = (0.0,)  # the level is decided on fp32 s: a few grid steps suffice

    def quantize(self, w: torch.Tensor, *, name: str = "tensor") -> Quantized:
        q = quantize_nf4(w, self.group_size, name=name)
        return Quantized(q.codes.reshape(q.shape), q.absmax, None, q.shape, q.dtype, self.name)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        return dequantize_nf4(_as_nf4(q, self.group_size))

    def element_grid(self, w: torch.Tensor, q: Quantized) -> ElementGrid:
        return absmax_grid(q.scales, q.numel, self.group_size)

    def level_of(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return codes_from_scaled(scaled_fixed(x, params)).long()

    def cell_bounds_flat(self, q: Quantized, grid: ElementGrid) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = cell_bounds_scaled(q.codes.device)
        c = q.codes.reshape(-1).long()
        return lo[c] * grid.cap_hi, hi[c] * grid.cap_hi

    def bin_width(self, w: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """(T^+_c - T^-_c) * a_b in one chunked pass (mansu.quant.geometry.bin_width, tested there)."""

        return bin_width(w, self.group_size, name=name)

    def move_target(self, w: torch.Tensor, direction: Direction, *,
                    name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
        """mansu.quant.geometry's stepping search (2x faster), or the generic bisection when a block absmax is
        subnormal (0 < a_b < 1e-38): bitsandbytes' clamped reciprocal (1 / 1e-38) then puts the boundaries far
        from t * a, where the stepping search does not converge (it raises).  tests/test_quantizers.py checks
        that the two agree element for element on every other input."""

        absmax = quantize_nf4(w, self.group_size, name=name).absmax
        if bool(((absmax > 0) & (absmax < ABSMAX_FLOOR)).any()):
            return super().move_target(w, direction, name=name)
        return code_change_target(w, direction, self.group_size, name=name)


def _as_nf4(q: Quantized, blocksize: int) -> NF4Quantized:
    return NF4Quantized(q.codes.reshape(-1), q.scales, q.shape, q.dtype, blocksize)


def absmax_grid(absmax: torch.Tensor, n: int, blocksize: int) -> ElementGrid:
    """Blockwise-absmax element grid (nf4, fp4): the stored absmax a_b of each element (caps -a_b, +a_b), its
    fp32 reciprocal for full blocks and the divisor for the partial last block (bitsandbytes' two roundings).
    params: recip fp32, div fp32, partial bool = 9 B per weight; caps 8 B per weight."""
    a = absmax.repeat_interleave(blocksize)[:n]
    a_floor = a.clamp(min=ABSMAX_FLOOR)
    partial = torch.arange(n, device=a.device) >= n - n % blocksize
    return ElementGrid({"recip": 1.0 / a_floor, "div": a_floor, "partial": partial}, -a, a)


def scaled_fixed(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """s = fl(x * fl(1/a)) on full blocks, fl(x / a) on the partial last block, fp32."""
    xf = x.float()
    return torch.where(params["partial"], xf / params["div"], xf * params["recip"])
