"""Pure-torch NF4 (bitsandbytes' 4-bit NormalFloat), bit-exact with bitsandbytes 0.50 on CPU tensors.

Blockwise absmax quantization (Dettmers et al. 2023, QLoRA), exactly as bitsandbytes' CPU path computes it
(`bitsandbytes/backends/default/ops.py`, kernel ``quantize_4bit``; the CPU backend registers no kernel of its own):

    x      = flatten(w).float()                                  # row-major, blocks may span rows
    a_b    = max_{i in b} |x_i|                                  # absmax of block b (blocksize elements;
                                                                 #   the last block may be partial)
    s_i    = clamp(x_i * fl(1 / max(a_b, 1e-38)), -1, 1)         # full blocks: multiply by the fp32 reciprocal
    s_i    = clamp(x_i / max(a_b, 1e-38), -1, 1)                 # the partial last block: a true division
    code_i = #{k : t_k < s_i},   t_k = fl((L_k + L_{k+1}) / 2)   # fp32 midpoints of adjacent levels
                                                                 #   (bnb: torch.bucketize, right=False;
                                                                 #   here an equivalent lookup table)
    deq_i  = fl(L[code_i] * a_b)  cast to the input dtype         # the CPU C++ dequantize kernel

so a value exactly on a midpoint t_k gets code k, the LOWER level.  An argmin over |s - L_k| would also pick the
lower level at an exact fp32 tie (torch.argmin returns the first minimum), but its distances are rounded:
``|s - L_k|`` and ``|s - L_{k+1}|`` compare unequal at s == t_k for k = 0, 1, 3, 4, 12, 14 (argmin picks the
upper level there; measured, tested), so it is not equivalent; we follow bitsandbytes' bucketize.

Tensors on an accelerator are processed on their device in one chunk (written for CUDA, tested on CPU only);
on the CPU the work runs in block-aligned chunks over a thread pool (see `quantize_flat`).

Stored quirks we reproduce: the absmax of an all-zero full block is 0 (its codes are 7, the 0.0 level), but the
absmax of an all-zero partial last block is stored clamped, as 1e-38.  An odd element count is padded with one
0.0 before packing, so the last byte's low nibble holds code 7.  Packing: byte j = (code_{2j} << 4) | code_{2j+1},
shape [(n + 1) // 2, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # bitsandbytes get_4bit_type("nf4"), ascending, so code k <-> level k
DEFAULT_BLOCKSIZE = 64  # bitsandbytes' and transformers' default
ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps the absmax to this before taking 1/absmax
CHUNK_ELEMENTS = 32767  # per chunk of the hot loop: below torch's 32768 grain size, so each op runs inline
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def nf4_levels(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor [16], ascending."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def nf4_thresholds(device: torch.device | str | None = None) -> torch.Tensor:
    """The 15 decision thresholds t_k = fl32((L_k + L_{k+1}) / 2) [15], computed in fp32 like bitsandbytes."""
    levels = nf4_levels(device)
    return (levels[:-1] + levels[1:]) / 2


@dataclass(frozen=True)
class NF4Quantized:
    """One tensor in NF4: `codes` uint8 [n] (flat, row-major, 0..15), `absmax` fp32 [ceil(n / blocksize)]."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def packed(self) -> torch.Tensor:
        """bitsandbytes' packed layout: uint8 [(n + 1) // 2, 1], high nibble = even element."""
        return pack_nf4(self.codes)


def validate_weight(x: torch.Tensor, name: str = "tensor", blocksize: int = DEFAULT_BLOCKSIZE, *,
                    check_finite: bool = True) -> None:
    """Raise ValueError (naming `name`) unless `x` is a non-empty finite fp32/bf16/fp16 tensor and blocksize is a
    positive even int."""
    validate_blocksize(blocksize, name)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} is not supported; NF4 accepts float32, bfloat16 or float16")
    if x.numel() == 0:
        raise ValueError(f"{name}: tensor is empty; NF4 needs at least one element")
    if check_finite and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name}: contains {n_nan} NaN and {n_inf} Inf values; NF4 needs finite weights")


def validate_blocksize(blocksize: int, name: str = "tensor") -> None:
    """Raise ValueError unless blocksize is a positive even int (bitsandbytes itself accepts 32..4096, powers of 2)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"{name}: blocksize must be a positive even integer (e.g. 64), got {blocksize!r}")


def block_absmax(x_flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The stored fp32 absmax per block [n_blocks], with bitsandbytes' clamp on a partial last block."""
    n = x_flat.numel()
    full = n - n % blocksize
    parts = []
    if full:
        parts.append(x_flat[:full].view(-1, blocksize).abs().amax(dim=1).float())
    if full < n:
        parts.append(x_flat[full:].abs().amax().float().clamp(min=ABSMAX_FLOOR).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def scale_by_block(x_flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """s = x / absmax per block, rounded exactly as bitsandbytes does (reciprocal-multiply on full blocks, division
    on the partial last block), not clamped: clamping to [-1, 1] never changes a code.  fp32 [n]."""
    x = x_flat.float()
    n = x.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if full:
        recip = 1.0 / absmax[: full // blocksize].clamp(min=ABSMAX_FLOOR)
        torch.mul(x[:full].view(-1, blocksize), recip.view(-1, 1), out=out[:full].view(-1, blocksize))
    if full < n:
        out[full:] = x[full:] / absmax[-1].clamp(min=ABSMAX_FLOOR)
    return out


_LUT_CELLS = 1024  # uniform cells over [-1, 1]; each is 0.002 wide, far narrower than the 0.08 threshold gap
_LUT_SLOP = 1e-4  # >> fp32 rounding of the cell index, << the threshold gap


@functools.lru_cache(maxsize=8)
def _code_lut(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(base, thr) per cell j of [-1, 1]: base_j = #{k : t_k < lo_j - slop}, thr_j = t_{base_j} (inf past t_14).

    For s in cell j, at most t_{base_j} lies in [lo_j - slop, s), because t_{base_j + 1} >= t_{base_j} + 0.08 is
    beyond the cell, so #{k : t_k < s} = base_j + [s > thr_j] exactly: bucketize's answer with one table lookup
    and one comparison instead of a binary search (2.5x faster on CPU)."""
    t = nf4_thresholds()
    lo = torch.arange(_LUT_CELLS, dtype=torch.float64) * (2 / _LUT_CELLS) - 1
    base = (t.double()[None, :] < (lo[:, None] - _LUT_SLOP)).sum(1)
    thr = torch.cat([t, torch.tensor([float("inf")])])[base]
    return base.to(device=device, dtype=torch.int32), thr.to(device)


def codes_from_scaled(s: torch.Tensor) -> torch.Tensor:
    """code = #{k : t_k < s} (a tie goes to the lower level), int32 [n]; equal to
    torch.bucketize(s, nf4_thresholds(), right=False) for every finite fp32 s."""
    base, thr = _code_lut(str(s.device))
    half = _LUT_CELLS / 2
    idx = torch.mul(s, half).add_(half).to(torch.int32).clamp_(0, _LUT_CELLS - 1)  # truncation; slop covers it
    code = torch.index_select(base, 0, idx)
    code += torch.gt(s, torch.index_select(thr, 0, idx))
    return code


def quantize_nf4(x: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, *, name: str = "tensor") -> NF4Quantized:
    """Quantize `x` (fp32/bf16/fp16, any shape) to NF4 with blockwise absmax; bit-exact with bitsandbytes."""
    codes, absmax, _ = quantize_flat(x, blocksize, name=name, with_width=False)
    return NF4Quantized(codes, absmax, tuple(x.shape), x.dtype, blocksize)


def cell_widths_scaled(device: torch.device | str | None = None) -> torch.Tensor:
    """T^+_k - T^-_k per code, fp32 [16]: the bin width in units of the block absmax (edge cells end at +-1;
    see mansu.quant.geometry)."""
    t = nf4_thresholds(device)
    one = torch.ones(1, device=device)
    return torch.cat([t, one]) - torch.cat([-one, t])


def quantize_flat(x: torch.Tensor, blocksize: int, *, name: str = "tensor",
                  with_width: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes uint8 [n], absmax fp32 [blocks], bin width fp32 [n] or None) of x, validated.

    The work runs in chunks of whole blocks small enough that every torch op stays single-threaded
    (below torch's 32768-element grain size) and cache-resident; the chunks are spread over a thread pool of
    torch.get_num_threads() workers (torch ops release the GIL).  This avoids one OpenMP barrier per op per
    chunk, which on a loaded machine cost more than the arithmetic, and bounds temporaries to a few chunks.
    """
    validate_weight(x, name, blocksize, check_finite=False)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    dev = flat.device
    codes = torch.empty(n, dtype=torch.uint8, device=dev)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=dev)
    width = torch.empty(n, dtype=torch.float32, device=dev) if with_width else None
    widths = cell_widths_scaled(dev)
    step = chunk_step(blocksize, n, dev)

    def work(start: int) -> bool:
        stop = min(start + step, n)
        xc = flat[start:stop]
        if not bool(torch.isfinite(xc).all()):
            return False
        a = block_absmax(xc, blocksize)  # chunks start on block boundaries; only the last holds a partial block
        absmax[start // blocksize : start // blocksize + a.numel()] = a
        c = codes_from_scaled(scale_by_block(xc, a, blocksize))
        codes[start:stop] = c
        if width is not None:
            wc = width[start:stop]
            torch.index_select(widths, 0, c, out=wc)
            mul_by_block(wc, a, blocksize)
        return True

    if not all(run_chunks(work, range(0, n, step))):
        validate_weight(x, name, blocksize)  # raises with the NaN / Inf counts
    return codes, absmax, width


def chunk_step(blocksize: int, n: int, device: torch.device) -> int:
    """Elements per chunk: whole blocks below torch's grain size on the CPU; one chunk on an accelerator."""
    if device.type != "cpu":
        return max(n, 1)
    return max(1, CHUNK_ELEMENTS // blocksize) * blocksize


def run_chunks(work: Callable[[int], Any], starts: range) -> list[Any]:
    """[work(s) for s in starts], spread over the thread pool."""
    workers = torch.get_num_threads()
    if workers <= 1 or len(starts) <= 1:
        return [work(s) for s in starts]
    return list(_pool(workers).map(work, starts))


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mansu-nf4")


def mul_by_block(v: torch.Tensor, a: torch.Tensor, blocksize: int) -> None:
    """v[i] *= a[i // blocksize] in place (v is a chunk starting on a block boundary)."""
    full = v.numel() - v.numel() % blocksize
    if full:
        v[:full].view(-1, blocksize).mul_(a[: full // blocksize].view(-1, 1))
    if full < v.numel():
        v[full:].mul_(a[-1])


def dequantize_nf4(q: NF4Quantized) -> torch.Tensor:
    """deq_i = fl32(L[code_i] * absmax_b), cast to q.dtype, reshaped to q.shape (bitsandbytes' CPU kernel)."""
    vals = nf4_levels(q.codes.device)[q.codes.long()]
    n = q.numel
    full = n - n % q.blocksize
    if full:
        vals[:full].view(-1, q.blocksize).mul_(q.absmax[: full // q.blocksize].view(-1, 1))
    if full < n:
        vals[full:].mul_(q.absmax[-1])
    return vals.to(q.dtype).reshape(q.shape)


def nf4_round_trip(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, *, name: str = "tensor") -> torch.Tensor:
    """dequantize(quantize(w)): the weight an NF4 model computes with, same shape and dtype as `w`."""
    return dequantize_nf4(quantize_nf4(w, blocksize, name=name))


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """Pack flat codes two per byte in bitsandbytes' order; an odd count is padded with code 7 (the 0.0 level)."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, torch.full((1,), 7, dtype=torch.uint8, device=c.device)])
    return ((c[0::2] << 4) | c[1::2]).unsqueeze(1)


def unpack_nf4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_nf4: flat uint8 codes [numel]."""
    p = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    out = torch.empty(p.numel() * 2, dtype=torch.uint8, device=p.device)
    out[0::2] = p >> 4
    out[1::2] = p & 0xF
    return out[:numel]
