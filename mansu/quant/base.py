"""The Quantizer interface: one weight-only quantizer (its storage grid, bit-exact with a named library), the cell
each weight sits in, and the exact smallest move that changes a weight's quantized value with the scales held
fixed.  Implementations: one module each in mansu.quant.quantizers (nf4, fp4, int8, int4 for int4-g128); the one
list: mansu.quant.registry.QUANTIZERS.

Every quantizer here stores a weight w (in its view: [out, in] for a Linear, groups along the last axis or over
the flat tensor) as small integer codes plus per-group scales (and zero points), and a weight's quantized value
is a monotone step function of w once the group's scales are fixed:

    level(x) = the index of x's cell among the group's distinct dequantized values, non-decreasing in x,
    cell of w = (lower, upper]  (weight units, fp32; ties at a boundary follow the library's rounding),
    bin_width = upper - lower   (edge cells end where a move would change the scales: `scale_caps`).

The scales are a function of a few elements of the group (the absmax for symmetric grids; the min and the max
for asymmetric ones).  A move that changes one of them, or that takes any element past them, rescales the whole
group, so every code of the group may change.  `frozen_mask` marks the elements that set the scales (every tied
element is marked), `scale_caps` gives per element the range [cap_lo, cap_hi] a move must stay within, and
`min_move` answers for fixed scales only: inf for frozen elements and where no move inside the caps changes the
level.

Exact boundaries.  The level is decided on the library's rounded arithmetic (e.g. fl(x * fl(1/a))), not on the
real-number boundary, so `min_move` searches w's dtype grid: it bisects over the ordered integer representation
of w's dtype between w and the cap (first narrowed to a few steps around the real-number boundary where the level
function confirms it), using the quantizer's own level function (monotone in x), and returns the
move to the first representable weight whose level differs, rounded up to fp32 so that fl(w + direction * move)
reaches that weight while the representable weight before it keeps the level.

"Code" versus "level".  Codes are the library's stored integers; levels are distinct dequantized values.  They
agree except for bitsandbytes fp4, whose codes 0 and 8 are both 0.0 (+0 and "-0", chosen by the sign side of a
tiny scaled value): moving between them changes a stored code but not the weight the model computes with, so
the geometry works on levels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

Direction = Literal[1, -1]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEARCH_CHUNK = 1 << 20  # elements per chunk of the min_move search: bounds its temporaries to ~50 MB
BRACKET_STEPS = 4  # the real-number boundary is usually within a few grid steps of the exact one


@dataclass(frozen=True)
class Quantized:
    """One tensor under one quantizer.

    codes:  the library's stored integers, shaped like the weight (uint8; int8 for int8)   1 B per weight
    scales: per group (fp32 absmax for nf4/fp4/int8; the weight's dtype for int4)           4/group_size B
    zeros:  per group zero points (int4 only, uint8 in GPTQ's unsigned convention), or None
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    quantizer: str

    @property
    def numel(self) -> int:
        return self.codes.numel()


@dataclass(frozen=True)
class ElementGrid:
    """Per-element state for the fixed-scale geometry, flat [n] tensors (so a chunk is a slice):

    params: quantizer-specific tensors the level function needs (e.g. the element's scale)   3-9 B per weight
    cap_lo, cap_hi: fp32, the range a move must stay within to keep the scales              8 B per weight
    """

    params: dict[str, torch.Tensor]
    cap_lo: torch.Tensor
    cap_hi: torch.Tensor

    def chunk(self, start: int, stop: int) -> ElementGrid:
        return ElementGrid({k: v[start:stop] for k, v in self.params.items()}, self.cap_lo[start:stop],
                           self.cap_hi[start:stop])


class Quantizer(ABC):
    """A weight-only quantizer.  Subclasses set the class attributes and implement quantize, dequantize, the
    per-element grid, the level function and the cell bounds; the geometry (bin_width, min_move, frozen_mask)
    follows generically."""

    name: ClassVar[str]
    group_size: ClassVar[int]  # weights per scale (blocksize for nf4/fp4; the row length for int8: 0)
    symmetric: ClassVar[bool]
    library: ClassVar[str]  # the reference it is bit-exact with
    description: ClassVar[str]
    # bin-width fractions tried around the real-number boundary before bisecting (0.0: BRACKET_STEPS grid steps);
    # a quantizer whose level is decided on x's own precision (nf4, fp4) needs only the grid steps
    brackets: ClassVar[tuple[float, ...]] = (0.1, 1e-3, 1e-5, 0.0)

    # ---- storage ------------------------------------------------------------------------------------------
    @abstractmethod
    def quantize(self, w: torch.Tensor, *, name: str = "tensor") -> Quantized:
        """Codes and scales of w, bit-exact with the library."""

    @abstractmethod
    def dequantize(self, q: Quantized) -> torch.Tensor:
        """The weight the quantized model computes with, shaped and typed like the original."""

    def round_trip(self, w: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """dequantize(quantize(w))."""
        return self.dequantize(self.quantize(w, name=name))

    # ---- the fixed-scale geometry: what a subclass provides -----------------------------------------------
    @abstractmethod
    def element_grid(self, w: torch.Tensor, q: Quantized) -> ElementGrid:
        """Per-element parameters of the level function and the scale caps of w (q = self.quantize(w))."""

    @abstractmethod
    def level_of(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The level (int64, monotone non-decreasing in x) of candidate flat weights x (the weight's dtype),
        each with its own element's fixed scales."""

    @abstractmethod
    def cell_bounds_flat(self, q: Quantized, grid: ElementGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) of each element's cell in weight units, fp32 [n], clipped to the scale caps."""

    def scale_view(self, x: torch.Tensor) -> torch.Tensor:
        """The value the scale statistics are computed from, fp32 (int8 first casts to fp16)."""
        return x.float()

    def quantize_with_grid(self, w: torch.Tensor, *, name: str = "tensor") -> tuple[Quantized, ElementGrid]:
        q = self.quantize(w, name=name)
        return q, self.element_grid(w, q)

    # ---- geometry ---------------------------------------------------------------------------------------
    def cell_bounds(self, w: torch.Tensor, *, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) of each weight's cell with the scales fixed, fp32 shaped like w (8 B per weight)."""
        q, grid = self.quantize_with_grid(w, name=name)
        lower, upper = self.cell_bounds_flat(q, grid)
        return lower.reshape(w.shape), upper.reshape(w.shape)

    def bin_width(self, w: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """Each weight's cell width in weight units, fp32 shaped like w (4 B per weight)."""
        lower, upper = self.cell_bounds(w, name=name)
        return upper - lower

    def scale_caps(self, w: torch.Tensor, *, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
        """(cap_lo, cap_hi) per weight, fp32 shaped like w: a weight moved outside changes its group's scales
        (symmetric: -absmax, +absmax; asymmetric: the group's min and max, widened to include 0 where the
        library does)."""
        _, grid = self.quantize_with_grid(w, name=name)
        return grid.cap_lo.reshape(w.shape), grid.cap_hi.reshape(w.shape)

    def frozen_mask(self, w: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
        """bool shaped like w: the elements that set their group's scales (equal to a cap; every tied element),
        which no scale-preserving move may touch (1 B per weight)."""
        _, grid = self.quantize_with_grid(w, name=name)
        v = self.scale_view(w.detach().reshape(-1))
        return ((v == grid.cap_hi) | (v == grid.cap_lo)).reshape(w.shape)

    def min_move(self, w: torch.Tensor, direction: Direction, *, name: str = "tensor") -> torch.Tensor:
        """Per weight, the smallest m >= 0 such that fl(w + direction * m) has a different level with the scales
        fixed; inf for frozen elements and where impossible inside the caps.  fp32 shaped like w (4 B per
        weight; the search holds ~40 B per element of one chunk)."""
        target, feasible = self.move_target(w, direction, name=name)
        return move_from_target(w, target, feasible)

    def move_target(self, w: torch.Tensor, direction: Direction, *,
                    name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
        """(target, feasible): the first weight on w's dtype grid, going in `direction`, whose level differs,
        with the scales fixed; where infeasible target == w.  Both shaped like w; target has w's dtype."""
        if direction not in (1, -1):
            raise ValueError(f"{name}: direction must be 1 (up) or -1 (down), got {direction!r}")
        q, grid = self.quantize_with_grid(w, name=name)
        lower, upper = self.cell_bounds_flat(q, grid)
        estimate, width = (upper if direction == 1 else lower), upper - lower
        x = w.detach().reshape(-1)
        target = torch.empty_like(x)
        feasible = torch.empty(x.numel(), dtype=torch.bool, device=x.device)
        for start in range(0, x.numel(), SEARCH_CHUNK):
            stop = min(start + SEARCH_CHUNK, x.numel())
            t, f = self._search(x[start:stop], grid.chunk(start, stop), direction, estimate[start:stop],
                                width[start:stop])
            target[start:stop], feasible[start:stop] = t, f
        return target.reshape(w.shape), feasible.reshape(w.shape)

    def _search(self, x: torch.Tensor, grid: ElementGrid, direction: int, estimate: torch.Tensor,
                width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bisection on x's dtype grid between x and the cap (see the module docstring), bracketed first around
        the real-number cell boundary `estimate` (cell width `width`)."""
        v = self.scale_view(x)
        frozen = (v == grid.cap_hi) | (v == grid.cap_lo)
        cap = inner_cap(self, grid.cap_hi if direction == 1 else grid.cap_lo, x.dtype, direction)
        level0 = self.level_of(x, grid.params)
        feasible = ~frozen & (self.level_of(cap, grid.params) != level0)
        near, far = to_ordered(x), to_ordered(torch.where(feasible, cap, x))  # level(near) == level0 != level(far)
        near, far = self._bracket(near, far, estimate, width, direction, level0, grid, x.dtype)
        while True:
            gap = (far - near).abs()
            if not bool((gap > 1).any()):
                break
            mid = near + (far - near) // 2  # strictly between near and far where gap > 1
            moved = self.level_of(from_ordered(mid, x.dtype), grid.params) != level0
            far, near = torch.where(moved, mid, far), torch.where(moved, near, mid)
        return torch.where(feasible, from_ordered(far, x.dtype), x), feasible

    def _bracket(self, near: torch.Tensor, far: torch.Tensor, estimate: torch.Tensor, width: torch.Tensor,
                 direction: int, level0: torch.Tensor, grid: ElementGrid,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Narrow [near, far] around the real-number boundary `estimate`, at distances of `brackets` x the bin width
        and a few grid steps: the level function is monotone, so a point with the old level is a valid `near` and
        one with a new level a valid `far`."""
        lo, hi = torch.minimum(near, far), torch.maximum(near, far)
        guess = to_ordered(estimate.to(dtype))
        for frac in self.brackets:
            if frac:
                a = to_ordered((estimate - direction * frac * width).to(dtype))
                b = to_ordered((estimate + direction * frac * width).to(dtype))
            else:
                a, b = guess - direction * BRACKET_STEPS, guess + direction * BRACKET_STEPS
            a, b = torch.clamp(a, lo, hi), torch.clamp(b, lo, hi)
            near = torch.where(self.level_of(from_ordered(a, dtype), grid.params) == level0, a, near)
            far = torch.where(self.level_of(from_ordered(b, dtype), grid.params) != level0, b, far)
            lo, hi = torch.minimum(near, far), torch.maximum(near, far)
        return near, far


def inner_cap(quantizer: Quantizer, cap: torch.Tensor, dtype: torch.dtype, direction: int) -> torch.Tensor:
    """The outermost weight of `dtype` whose scale view stays within the fp32 cap, going in `direction`."""
    c = cap.to(dtype)
    toward = torch.full_like(c, float("-inf") if direction == 1 else float("inf"))
    for _ in range(4):  # one step suffices: the cap is itself (nearly) a value of dtype
        v = quantizer.scale_view(c)
        over = (v > cap) if direction == 1 else (v < cap)
        if not bool(over.any()):
            return c
        c = torch.where(over, torch.nextafter(c, toward), c)
    raise RuntimeError("inner_cap did not converge")  # a bug, not user input


_INT_VIEW = {torch.float32: (torch.int32, 31), torch.bfloat16: (torch.int16, 15), torch.float16: (torch.int16, 15)}


def to_ordered(x: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 so that the order (and adjacency) of representable values is the integer order;
    +0 and -0 both map to 0."""
    itype, bits = _INT_VIEW[x.dtype]
    i = x.contiguous().view(itype).long()
    return torch.where(i < 0, -(i + (1 << bits)), i)  # negative: sign-magnitude -> -(magnitude)


def from_ordered(o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of to_ordered (0 maps to +0)."""
    itype, bits = _INT_VIEW[dtype]
    return torch.where(o < 0, -o - (1 << bits), o).to(itype).view(dtype)


def move_from_target(w: torch.Tensor, target: torch.Tensor, feasible: torch.Tensor) -> torch.Tensor:
    """|target - w| as fp32, rounded up (so fl(w + direction * move) reaches target); inf where infeasible."""
    move = (target.double() - w.detach().double()).abs().masked_fill(~feasible, 0.0)
    out = move.float()
    out = torch.where(out.double() < move, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
    return out.masked_fill(~feasible, float("inf"))


def validate_float_weight(x: torch.Tensor, name: str, quantizer: str, *, check_finite: bool = True) -> None:
    """Raise ValueError unless x is a non-empty (finite) fp32/bf16/fp16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} is not supported; {quantizer} accepts float32, bfloat16 or "
                         "float16")
    if x.numel() == 0:
        raise ValueError(f"{name}: tensor is empty; {quantizer} needs at least one element")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} Inf "
                         f"values; {quantizer} needs finite weights")
