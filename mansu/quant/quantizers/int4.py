"""int4-g128: asymmetric round-to-nearest int4 with group size 128 and integer zero points, the storage grid of
GPTQ / AWQ checkpoints (without their calibration), bit-exact with compressed-tensors 0.20 (the format library of
llmcompressor and vLLM: scheme W4A16_ASYM, `compute_dynamic_scales_and_zp` + `quantize` / `dequantize`).

Groups are 128 consecutive weights along the last axis (the input axis of a Linear weight [out, in]); everything
is computed in the weight's own dtype (bf16 weights get bf16 scales), as the library does:

    lo_g   = min(min_{i in g} x_i, 0)        hi_g = max(max_{i in g} x_i, 0)     (0 is always representable)
    s_g    = fl(fl(hi_g - lo_g) / 15)        replaced by the dtype's eps where it is 0 (an all-zero group)
    z_g    = round_half_even(clamp(fl(-8 - fl(lo_g / s_g)), -8, 7))   (int; NaN on an all-zero group -> 0)
    q_i    = round_half_even(clamp(fl(fl(x_i / s_g) + z_g), -8, 7))   in [-8, 7]
    deq_i  = fl((q_i - z_g) * s_g)

Stored here in GPTQ's unsigned convention: code = q + 8 in [0, 15] (uint8), zero = z + 8 (uint8), so
deq = (code - zero) * s.  With the scales fixed the cell of q is ((q - z - 1/2) s, (q - z + 1/2) s] (ties at
exact halves go to the even q), clipped to the scale caps [lo_g, hi_g]: bin width s_g inside, about s_g / 2 at the
edges.  The elements equal to lo_g < 0 or hi_g > 0 set the scales and are frozen; a move must stay in [lo_g, hi_g].
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mansu.quant.base import ElementGrid, Quantized, Quantizer, validate_float_weight
from mansu.quant.nf4 import run_chunks

GROUP_SIZE = 128
BIT_MIN, BIT_MAX = -8.0, 7.0
CHUNK_ELEMENTS = 1 << 17  # whole rows per chunk (at least one); measured fastest on 2 cores


def _consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's range as 0-dim fp32 tensors (they keep the weight's dtype in mixed arithmetic)."""
    return torch.tensor(BIT_MIN, device=device), torch.tensor(BIT_MAX, device=device)


def group_qparams(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, zero int8 in [-8, 7], lo, hi) of groups g [..., G, 128], in g's dtype (compressed-tensors'
    calculate_qparams, asymmetric int4)."""
    bit_min, bit_max = _consts(g.device)
    lo, hi = torch.aminmax(g, dim=-1)
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    scale = (hi - lo) / (bit_max - bit_min).to(hi.dtype)
    zero = torch.clamp(bit_min - (lo / scale), bit_min, bit_max)
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=g.device)
    scale = torch.where(scale == 0, eps, scale)
    zero = torch.round(torch.clamp(zero, -128, 127)).to(torch.int8)
    return scale, zero, lo, hi


def codes_fixed(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q in [-8, 7] (float, x's dtype) of x with broadcastable fixed scale and zero (compressed-tensors' _quantize)."""
    scaled = x / scale
    scaled += zero.to(x.dtype)
    return scaled.clamp_(BIT_MIN, BIT_MAX).round_()  # clamping is exact: same as the library's tensor bounds


def quantize_int4(w: torch.Tensor, *, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 like w, scales [rows, G] in w's dtype, zeros uint8 [rows, G]); chunked by rows over the thread
    pool (temporaries ~12 B per element of a chunk; outputs 1 B per weight + 3-5 B per group)."""
    validate_float_weight(w, name, "int4-g128", check_finite=False)
    cols = w.shape[-1] if w.dim() else 1
    if cols % GROUP_SIZE:
        raise ValueError(f"{name}: int4-g128 groups {GROUP_SIZE} weights along the last axis; its length must be a "
                         f"multiple of {GROUP_SIZE}, got shape {tuple(w.shape)}")
    groups = cols // GROUP_SIZE
    x = w.detach().reshape(-1, groups, GROUP_SIZE)
    rows = x.shape[0]
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows, groups, dtype=w.dtype, device=x.device)
    zeros = torch.empty(rows, groups, dtype=torch.uint8, device=x.device)
    step = rows if x.device.type != "cpu" else max(1, CHUNK_ELEMENTS // cols)

    def work(start: int) -> bool:
        g = x[start:start + step]
        s, z, lo, hi = group_qparams(g)
        if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):  # aminmax propagates NaN
            return False
        scales[start:start + g.shape[0]] = s
        zeros[start:start + g.shape[0]] = (z + 8).to(torch.uint8)
        codes[start:start + g.shape[0]].copy_(codes_fixed(g, s.unsqueeze(-1), z.unsqueeze(-1)).add_(8))
        return True

    if not all(run_chunks(work, range(0, rows, step))):
        validate_float_weight(w, name, "int4-g128")  # raises with the NaN / Inf counts
    return codes.reshape(w.shape), scales, zeros


class Int4G128(Quantizer):
    name: ClassVar[str] = "int4-g128"
    group_size: ClassVar[int] = GROUP_SIZE
    symmetric: ClassVar[bool] = False
    library: ClassVar[str] = "compressed_tensors (W4A16_ASYM: int4, asymmetric, group 128), CPU"
    description: ClassVar[str] = "asymmetric RTN int4, group 128, integer zero points (GPTQ/AWQ storage grid)"

    def quantize(self, w: torch.Tensor, *, name: str = "tensor") -> Quantized:
        codes, scales, zeros = quantize_int4(w, name=name)
        return Quantized(codes, scales, zeros, tuple(w.shape), w.dtype, self.name)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        c = q.codes.reshape(*q.scales.shape, GROUP_SIZE)
        deq = (c.to(q.scales.dtype) - q.zeros.to(q.scales.dtype).unsqueeze(-1)) * q.scales.unsqueeze(-1)
        return deq.to(q.dtype).reshape(q.shape)

    def element_grid(self, w: torch.Tensor, q: Quantized) -> ElementGrid:
        """params: the element's scale (w's dtype, 2-4 B per weight) and zero (int8, 1 B per weight); caps: the
        group's lo and hi (fp32, 8 B per weight), from w: the stored scale and zero do not give them exactly."""
        g = w.detach().reshape(*q.scales.shape, GROUP_SIZE)
        lo = torch.min(torch.amin(g, dim=-1), torch.zeros((), dtype=g.dtype, device=g.device))
        hi = torch.max(torch.amax(g, dim=-1), torch.zeros((), dtype=g.dtype, device=g.device))

        def per_element(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).repeat_interleave(GROUP_SIZE)

        zero = q.zeros.to(torch.int16) - 8
        return ElementGrid({"scale": per_element(q.scales), "zero": per_element(zero.to(torch.int8))},
                           per_element(lo.float()), per_element(hi.float()))

    def level_of(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return codes_fixed(x, params["scale"], params["zero"]).long()

    def cell_bounds_flat(self, q: Quantized, grid: ElementGrid) -> tuple[torch.Tensor, torch.Tensor]:
        s = grid.params["scale"].float()
        k = q.codes.reshape(-1).float() - 8 - grid.params["zero"].float()  # q - z
        return torch.maximum((k - 0.5) * s, grid.cap_lo), torch.minimum((k + 0.5) * s, grid.cap_hi)
