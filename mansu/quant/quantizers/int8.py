"""int8: bitsandbytes LLM.int8() weight storage (Dettmers et al. 2022) as `load_in_8bit` stores a Linear weight,
outlier threshold off; bit-exact with bitsandbytes 0.50 on CPU tensors.

`Int8Params._quantize` casts the weight to float16 and calls `int8_vectorwise_quant` (the default kernel in
`bitsandbytes/backends/default/ops.py`; the outlier threshold only matters for activations, so weights are stored
without it).  Per row r of the weight's view [rows, cols] (rows = all leading dims, cols = the last):

    h      = fp16(w)                                     # overflow beyond 65504 is rejected here
    a_r    = max_j |h_rj|   (fp32; SCB)
    code   = round_half_even( fl32(h * fl32(127 / a_r)) )  in [-127, 127], int8 (CB)
    deq    = fl32(fl32(code * a_r) * fl32(1/127))       # int8_vectorwise_dequant, cast to the weight's dtype

An all-zero row has a_r = 0; bitsandbytes computes 0 * inf = NaN there, which becomes code 0 on the CPU (tested);
mansu writes 0 explicitly.  Cells in weight units: ((code - 0.5), (code + 0.5)] * a_r / 127 (round half to even
decides which side a tie goes to), clipped to [-a_r, a_r]: bin width a_r / 127 inside, half that for codes +-127.
Scale caps: -a_r, +a_r (of the fp16 weight); the row's absmax elements are frozen.  The level of an fp32 or bf16
weight is decided after its fp16 rounding, which `min_move` follows.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mansu.quant.base import ElementGrid, Quantized, Quantizer, validate_float_weight
from mansu.quant.nf4 import run_chunks

FP16_MAX = 65504.0
CHUNK_ELEMENTS = 1 << 17  # whole rows per chunk (at least one); measured fastest on 2 cores (~1 MB temporaries)
INV_127 = 7.874015718698502e-3  # bitsandbytes' dequantize constant


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = shape[-1] if shape else 1
    return max(1, int(torch.Size(shape).numel()) // max(cols, 1)), cols


def quantize_int8(w: torch.Tensor, *, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [rows, cols], absmax fp32 [rows]) of w; chunked by rows over the thread pool (temporaries ~7
    B per element of a chunk; outputs 1 B per weight + 4 B per row).  NaN, Inf and weights that overflow
    float16 are found on the fp16 chunks (no extra pass) and raise ValueError."""
    validate_float_weight(w, name, "int8", check_finite=False)
    rows, cols = _rows(tuple(w.shape))
    x = w.detach().reshape(rows, cols)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    absmax = torch.empty(rows, dtype=torch.float32, device=x.device)
    step = rows if x.device.type != "cpu" else max(1, CHUNK_ELEMENTS // cols)

    def work(start: int) -> bool:
        h = x[start:start + step].to(torch.float16)
        lo, hi = torch.aminmax(h, dim=1)  # NaN propagates: one check per row finds NaN, Inf and fp16 overflow
        a = torch.maximum(hi, lo.neg()).float()  # max |h|, without an |h| temporary
        if not bool(torch.isfinite(a).all()):
            return False
        absmax[start:start + h.shape[0]] = a
        c = h * (127.0 / a.unsqueeze(-1))  # fp16 * fp32 -> fp32, as bitsandbytes
        c.round_()  # half to even
        if bool((a == 0).any()):
            c.masked_fill_(a.unsqueeze(-1) == 0, 0)
        codes[start:start + h.shape[0]].copy_(c)
        return True

    if not all(run_chunks(work, range(0, rows, step))):
        validate_float_weight(w, name, "int8")  # raises with the NaN / Inf counts
        raise ValueError(f"{name}: int8 (LLM.int8) stores float16 weights; |w| must be <= {FP16_MAX}, got "
                         f"{float(w.detach().abs().max())}")
    return codes, absmax


class Int8(Quantizer):
    name: ClassVar[str] = "int8"
    group_size: ClassVar[int] = 0  # one scale per row (the whole last axis)
    symmetric: ClassVar[bool] = True
    library: ClassVar[str] = "bitsandbytes.functional.int8_vectorwise_quant(fp16(w)) (Int8Params, load_in_8bit)"
    description: ClassVar[str] = "bitsandbytes LLM.int8 weights: row-wise absmax int8 of the fp16 weight"

    def quantize(self, w: torch.Tensor, *, name: str = "tensor") -> Quantized:
        codes, absmax = quantize_int8(w, name=name)
        return Quantized(codes.reshape(w.shape), absmax, None, tuple(w.shape), w.dtype, self.name)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        rows, cols = _rows(q.shape)
        deq = q.codes.reshape(rows, cols) * q.scales.view(-1, 1) * INV_127
        return deq.to(q.dtype).reshape(q.shape)

    def scale_view(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float16).float()

    def element_grid(self, w: torch.Tensor, q: Quantized) -> ElementGrid:
        """params: the row absmax a (fp32) and fl(127 / a) (fp32): 8 B per weight; caps 8 B per weight."""
        _, cols = _rows(q.shape)
        a = q.scales.repeat_interleave(cols)
        return ElementGrid({"a": a, "mult": 127.0 / a}, -a, a)

    def level_of(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        c = torch.round(x.to(torch.float16) * params["mult"])
        return c.masked_fill_(params["a"] == 0, 0).long()

    def cell_bounds_flat(self, q: Quantized, grid: ElementGrid) -> tuple[torch.Tensor, torch.Tensor]:
        a = grid.cap_hi
        c = q.codes.reshape(-1).float()
        step = a / 127.0
        return torch.maximum((c - 0.5) * step, -a), torch.minimum((c + 0.5) * step, a)
