"""The reversal's phase diagram: when does a quantizer undo a sub-bin update?  A controlled sweep on synthetic
linear layers (SPEC.md, "What we measured about sub-bin updates" and "Where the reversal does appear").

One point of the sweep is (fan-in d, aligned fraction f, update ratio rho):

    W      [n_out, d] random normal, std WEIGHT_STD (seeded)
    W'     = mansu.quant.alignment.aligned_view(q, W, f): a seeded fraction f of q's groups (64-weight blocks for
             nf4) replaced by their round trip, i.e. the base alignment "nf4:f" (f = 0 natural, f = 1 nf4-grid)
    x      [d] the probe input, standard normal (seeded)
    delta  the unlearning-like update, lowering every output on x; with b_ij the weight's bin width:
               gradient:  delta_ij = -eta x_j             (a step along -d(sum_i y_i)/dW: rank one, sizes ~ |x_j|)
               sign:      delta_ij = -eta b_ij sign(x_j)  (SPEC's coherent sign update: every |delta| / b equal)
           eta is set so that the median of |delta_ij| / b_ij over the free weights is rho.  The weights that set
           their group's scales (the block absmax) are frozen and moves are clipped at the scale caps, so the scales
           never change: the reversal is about moves inside cells (a moved absmax is another mechanism).

    D_i     = (delta x)_i < 0                              the change of output i in full precision
    Q_i     = ((RT(W' + delta) - RT(W')) x)_i              the change after quantization (RT = q's round trip)
    kappa_i = Q_i / D_i                                    1: unit i's change is kept; 0: erased

The PTQ gap of a synthetic layer.  Read each output unit as a fact whose answer logit must fall below a competitor
m_i under it, with margins m_i uniform in (0, |D_i|): the update forgets every fact in full precision, and after
quantization fact i is back iff -Q_i < m_i, which has probability clip(1 - kappa_i, 0, 1).  So

    gap = mean_i clip(1 - kappa_i, 0, 1)

is the fraction of the facts forgotten in full precision that quantization brings back: the demo's PTQ gap (forget
accuracy after NF4 minus in fp, as a fraction of what fp forgot) for facts of uniformly spread margins.  gap = 1 is
the full reversal (RT(W' + delta) == RT(W')), gap = 0 means quantization keeps every fact forgotten.  Its 95% CI is
over the n_out units.

The prediction (the signal-to-noise argument).  k(rho) is the base's kept fraction of a coherent update of rho bin
widths (mansu.quant.diagnose.tensor_sums: weights within rho b of the boundary they move towards change level, by
one bin; k = 1 for positions uniform in their cells, 0 on the grid for rho below ~0.4).  Each of the d weights
feeding unit i changes level with probability ~k rho, by one bin, so unit i sees N_i ~ Poisson(d k rho) level
changes and kappa_i = k N_i / (d k rho) has mean k and standard deviation k / snr with

    snr = sqrt(d k rho)                     (SPEC: sqrt(fan_in x ratio) on a natural base, k = 1)

The predicted gap is E[clip(1 - kappa, 0, 1)] under that count (`predicted_gap`); SPEC's Gaussian form
kappa ~ Normal(k, (k / snr)^2) (`gaussian_gap`) is its large-snr limit and misses the regime d k rho < ~1, where
most units see no level change at all and the facts come back.  The prediction needs only what
`mansu diagnose --ratio rho` reports for a base (k, fan-in) and the update's median |delta| / bin (a run's survival
report), never the update itself.  It ignores that the level changes carry unequal weights (b_ij |x_j|), which
adds spread, and, on a grid base, the update's tail: a heavy-tailed update with a small median can still move
its largest weights past the ~0.4-bin distance from a level to its boundary.

Memory: one base holds ~10 fp32 or bool tensors shaped like the layer (W, W', RT(W'), widths, caps, free mask,
delta, RT(W' + delta), their difference): ~37 B per weight, ~80 MB for 512 x 4096, plus diagnose's chunk
temporaries; nothing is kept across bases but a few numbers per point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch

from mansu.quant.alignment import aligned_view, fits
from mansu.quant.diagnose import tensor_sums
from mansu.quant.registry import DEFAULT_QUANTIZER, QUANTIZERS, get_quantizer

UpdateShape = Literal["gradient", "sign"]
UPDATE_SHAPES: tuple[str, ...] = get_args(UpdateShape)
WEIGHT_STD = 0.02  # the init scale of the Llama family; NF4 is scale-free, so only the shape of W matters
FAN_INS = (64, 256, 1024, 4096)  # one nf4 block up to a 7B model's hidden size
FRACTIONS = (0.0, 0.5, 1.0)  # natural, nf4:0.5, nf4-grid
RATIOS = tuple(round(10 ** (-3 + 3 * i / 9), 6) for i in range(10))  # 1e-3 .. 1 bin width, log-spaced
N_OUT = 512  # output units = facts per point: the gap's CI half-width is <= 0.05 at this size
Z95 = 1.959964


@dataclass(frozen=True)
class PhaseConfig:
    """The sweep's grid and the synthetic layer; every default is the documented sweep (docs/phase.md)."""
    fan_ins: tuple[int, ...] = FAN_INS
    fractions: tuple[float, ...] = FRACTIONS
    ratios: tuple[float, ...] = RATIOS
    shapes: tuple[str, ...] = UPDATE_SHAPES  # gradient: unlearning-like; sign: SPEC's table
    quantizer: str = DEFAULT_QUANTIZER
    n_out: int = N_OUT
    seed: int = 0

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if not self.shapes or any(s not in UPDATE_SHAPES for s in self.shapes):
            raise ValueError(f"update shapes {self.shapes!r}: choose among {', '.join(UPDATE_SHAPES)}")
        if not self.fan_ins or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in self.fan_ins):
            raise ValueError(f"fan-ins must be integers >= 2, got {self.fan_ins!r}")
        if not self.fractions or any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise ValueError(f"aligned fractions must lie in [0, 1] (0 natural, 1 grid), got {self.fractions!r}")
        if not self.ratios or any(not 0.0 < r <= 2.0 for r in self.ratios):
            raise ValueError(f"ratios (median |delta| / bin width) must lie in (0, 2], got {self.ratios!r}")
        if self.n_out < 2:
            raise ValueError(f"n_out (output units, the facts of a point) must be >= 2, got {self.n_out}")
        qz = get_quantizer(self.quantizer)
        bad = [d for d in self.fan_ins if not fits(qz, torch.empty(1, d))]
        if bad:
            raise ValueError(f"{self.quantizer} cannot quantize rows of fan-in {bad}; use multiples of its group size")


@dataclass(frozen=True)
class PhasePoint:
    """One point: the measured readouts and the SNR argument's predictions (see the module docstring)."""
    shape: str
    fan_in: int
    fraction: float
    ratio: float  # the target median |delta| / bin width, rho
    median_ratio: float  # measured over the free weights (differs from rho only by clipping at the caps)
    frac_level_changed: float  # free weights whose quantized value changed
    kept: float  # mean_i kappa_i
    gap: float
    gap_ci: float  # 95% half-width over units
    snr: float  # mean_i kappa_i / std_i kappa_i
    kept_pred: float  # k(rho) of the base, mansu.quant.diagnose
    snr_pred: float  # sqrt(d k rho)
    gap_pred: float
    regime: str = field(default="")


def _normal_partial(mu: float, s: float, a: float) -> float:
    """E[(Y - a)^+] for Y ~ Normal(mu, s^2)."""
    if s <= 0:
        return max(mu - a, 0.0)
    z = (mu - a) / s
    return (mu - a) * 0.5 * math.erfc(-z / math.sqrt(2)) + s * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def gaussian_gap(kept: float, fan_in: int, ratio: float) -> float:
    """E[clip(1 - kappa, 0, 1)] for kappa ~ Normal(k, (k / snr)^2), snr = sqrt(d k rho): SPEC's large-snr form."""
    if kept <= 0:
        return 1.0
    s = math.sqrt(kept / (fan_in * ratio))  # k / sqrt(d k rho)
    return _normal_partial(1.0 - kept, s, 0.0) - _normal_partial(1.0 - kept, s, 1.0)


def predicted_gap(kept: float, fan_in: int, ratio: float) -> float:
    """E[clip(1 - k N / lam, 0, 1)] for N ~ Poisson(lam), lam = d k rho = snr^2: the counting form of the SNR
    argument (unit i sees N level changes of one bin each; kappa_i = k N / lam has mean k and sd k / snr).  It
    tends to `gaussian_gap` at large snr and to 1 as lam -> 0 (a unit sees no level change with probability
    exp(-lam)); 1 when k <= 0."""
    lam = fan_in * kept * ratio
    if kept <= 0 or lam <= 0:
        return 1.0
    total, n = 0.0, 0
    while n * kept < lam:  # terms with k n >= lam are clipped to 0
        total += math.exp(n * math.log(lam) - lam - math.lgamma(n + 1)) * min(1.0 - kept * n / lam, 1.0)
        n += 1
    return total


REGIMES = (("kept", 0.1), ("noisy", 0.5), ("undone", 1.01))  # by predicted gap: < 0.1 kept, < 0.5 noisy, else undone


def regime_of(gap: float) -> str:
    """The named regime of a (predicted) gap: kept (< 0.1), noisy (< 0.5) or undone."""
    return next(name for name, upper in REGIMES if gap < upper)


def synthetic_layer(fan_in: int, n_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [n_out, fan_in] ~ Normal(0, WEIGHT_STD^2), probe x [fan_in] ~ Normal(0, 1)), seeded by (seed, fan_in)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + fan_in)
    w = torch.randn(n_out, fan_in, generator=gen) * WEIGHT_STD
    return w, torch.randn(fan_in, generator=gen)


@dataclass(frozen=True)
class BaseGeometry:
    """A base's fixed-scale geometry, shaped like it: bin widths and scale caps fp32, free mask bool (13 B/weight)."""
    width: torch.Tensor
    cap_lo: torch.Tensor
    cap_hi: torch.Tensor
    free: torch.Tensor  # neither setting its group's scales nor in a zero-width cell


def base_geometry(base: torch.Tensor, quantizer: str) -> BaseGeometry:
    qz = get_quantizer(quantizer)
    q, grid = qz.quantize_with_grid(base)
    lower, upper = (t.reshape(base.shape) for t in qz.cell_bounds_flat(q, grid))
    cap_lo, cap_hi = grid.cap_lo.reshape(base.shape), grid.cap_hi.reshape(base.shape)
    v = qz.scale_view(base)
    frozen = (v == cap_hi) | (v == cap_lo)
    return BaseGeometry(upper - lower, cap_lo, cap_hi, ~frozen & (upper > lower))


def unlearning_update(base: torch.Tensor, x: torch.Tensor, ratio: float, geo: BaseGeometry,
                      shape: UpdateShape) -> torch.Tensor:
    """delta for `base`: every free weight moves towards lowering all outputs on x, sized so that the median
    |delta| / bin over the free weights is `ratio`, then clipped at the scale caps (the module docstring)."""
    direction = -torch.sign(x).expand_as(base)  # lowers y_i = sum_j w_ij x_j for every i
    size = x.abs().expand_as(base) if shape == "gradient" else geo.width  # the unscaled |delta_ij|
    eta = ratio / float((size / geo.width.clamp(min=1e-30))[geo.free].median())
    raw = torch.where(geo.free, direction * eta * size, 0.0)
    return torch.minimum(torch.maximum(base + raw, geo.cap_lo), geo.cap_hi) - base


def measure_point(base: torch.Tensor, base_rt: torch.Tensor, geo: BaseGeometry, x: torch.Tensor, ratio: float,
                  shape: UpdateShape, quantizer: str) -> dict[str, float]:
    """The measured readouts of one update on one base (base_rt = RT(base))."""
    delta = unlearning_update(base, x, ratio, geo, shape)
    change = get_quantizer(quantizer).round_trip(base + delta) - base_rt
    fp_out, q_out = delta @ x, change @ x  # [n_out] each
    kappa = (q_out / fp_out).double()
    lost = (1 - kappa).clamp(0, 1)
    std = float(kappa.std())
    return {"median_ratio": float((delta.abs() / geo.width.clamp(min=1e-30))[geo.free].median()),
            "frac_level_changed": float((change != 0)[geo.free].float().mean()),
            "kept": float(kappa.mean()), "gap": float(lost.mean()),
            "gap_ci": Z95 * float(lost.std()) / math.sqrt(lost.numel()),
            "snr": float(kappa.mean()) / std if std > 0 else math.inf}


def base_kept_fraction(base: torch.Tensor, ratio: float, quantizer: str) -> float:
    """k(ratio) of a base, as `mansu diagnose` computes it (clamped at 0)."""
    sums = tensor_sums(quantizer, base, ratio=ratio)
    return max(sums["qd"] / sums["dd"], 0.0) if sums["dd"] else 0.0


def sweep_base(fan_in: int, fraction: float, cfg: PhaseConfig) -> list[PhasePoint]:
    """Every update shape and ratio of the grid on one base (fan-in, aligned fraction)."""
    w, x = synthetic_layer(fan_in, cfg.n_out, cfg.seed)
    qz = get_quantizer(cfg.quantizer)
    base = aligned_view(qz, w, fraction, seed=cfg.seed) if fraction > 0 else w
    base_rt, geo = qz.round_trip(base), base_geometry(base, cfg.quantizer)
    points = []
    for ratio in cfg.ratios:
        k = base_kept_fraction(base, ratio, cfg.quantizer)
        gap_pred = predicted_gap(k, fan_in, ratio)
        for shape in cfg.shapes:
            measured = measure_point(base, base_rt, geo, x, ratio, shape, cfg.quantizer)
            points.append(PhasePoint(shape=shape, fan_in=fan_in, fraction=fraction, ratio=ratio, **measured,
                                     kept_pred=k, snr_pred=math.sqrt(fan_in * k * ratio), gap_pred=gap_pred,
                                     regime=regime_of(gap_pred)))
    return points


def phase_sweep(cfg: PhaseConfig = PhaseConfig(), *, progress=None) -> list[PhasePoint]:
    """The whole grid, fan-in x aligned fraction x ratio x update shape; `progress(done, total)` after each base."""
    bases = [(d, f) for d in cfg.fan_ins for f in cfg.fractions]
    points: list[PhasePoint] = []
    for i, (d, f) in enumerate(bases):
        points.extend(sweep_base(d, f, cfg))
        if progress:
            progress(i + 1, len(bases))
    return points


def points_to_json(points: Sequence[PhasePoint], cfg: PhaseConfig) -> dict:
    """A JSON-ready record of a sweep: the config and one object per point."""
    def finite(row: dict) -> dict:  # JSON has no inf: an snr with no spread (every unit equal) is null
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return {"kind": "phase_sweep", "config": asdict(cfg), "points": [finite(asdict(p)) for p in points]}
