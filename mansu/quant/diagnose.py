"""Grid-alignment diagnostic: per weight tensor and per quantizer, how close the weights sit to that quantizer's
grid, and whether a sub-bin update on this model is expected to survive its rounding (SPEC.md, "What we measured
about sub-bin updates" and "Where the reversal does appear").

For a tensor W in quantizer q's view (mansu.quant.targets; groups and scales as q stores them), each weight w has a
cell (lower, upper] with the scales fixed, bin width b = upper - lower, and the level RT_q(w) it rounds to
(mansu.quant.base).  Over the free weights F (those that do not set their group's scales: `frozen_mask` elements
sit on a level by construction and are left out, as are zero-width cells):

    distance      a_w = |w - RT_q(w)| / b                mean over F: 0 on q's grid, ~0.25 for positions uniform
                                                         in their cells (more where levels are off-centre)
    on_grid       fraction of F with a_w < ON_GRID_TOL
    kept fraction k(r) = [#{w : upper - w < r b} + #{w : w - lower <= r b}] / (2 r |F|)

k(r) is the expected fraction of a coherent update of r bin widths (either sign, independent of where each weight
sits in its cell) that survives rounding: a weight changes level, by a whole bin, exactly when it lies within r b
of the boundary it moves towards, so the quantized change is k(r) times the update in expectation.  Positions
uniform in their cells give k = 1 (NF4 acts as an unbiased dither: the update is kept in expectation); weights on
the grid give k = 0 for every r below the level's distance to its cell boundary (the update rounds back to the
old code: the reversal).  The predicted signal-to-noise of the quantized change reaching one output unit, for a
tensor of fan-in d (the view's last axis), is

    snr = sqrt(d k r)       (SPEC.md's sqrt(d r) for uniform positions, k = 1; 0 on the grid)

since each of the d weights changes level with probability k r, by one bin.

Verdict (the stated rule, per quantizer, on k pooled over every free weight of the model):

    k(r) <  KEPT_THRESHOLD (0.5)  ->  "undone":  sub-bin forgetting on this model is expected to be undone by q
    k(r) >= KEPT_THRESHOLD        ->  "kept":    sub-bin forgetting on this model is kept in expectation by q

0.5 is the midpoint between the two pure regimes (k = 0 on the grid, k = 1 off it): below it, q rounds away more
of a sub-bin update than it keeps.  r defaults to RATIO = 0.05, the median |update| / bin width SPEC.md measured
for Adam baselines.

Cost: one pass per tensor and quantizer on the weight's device, in chunks of whole groups (rows in multiples of
64); the temporaries hold ~40 B per element of one chunk (codes 1 B, per-element grid 11-17 B, dequantized value,
cell bounds and the weight in fp32 16 B, masks); what is kept is a few sums per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from mansu.quant.alignment import fits
from mansu.quant.registry import get_quantizer
from mansu.quant.survival import layer_of
from mansu.quant.targets import NATURAL, QuantLayout, quant_layout, quantizable_parameter_names

KIND = "grid_alignment"
RATIO = 0.05  # the sub-bin update size r (bin widths) the verdict is stated for
KEPT_THRESHOLD = 0.5  # k(r) below this: the quantizer undoes more of a sub-bin update than it keeps
ON_GRID_TOL = 1e-3  # bin widths: a weight this close to its level counts as on the grid
CHUNK_ELEMENTS = 1 << 22  # elements per chunk (whole row groups): bounds the temporaries to ~160 MB
Verdict = Literal["undone", "kept"]
RULE = (f"k(r) = expected fraction of a coherent update of r bin widths kept after rounding (weights within r bin "
        f"widths of the cell boundary they move towards change level); verdict 'undone' iff k(r) < "
        f"{KEPT_THRESHOLD} over the model's free weights, else 'kept in expectation'")
_SUMS = ("n", "distance", "on_grid", "qd", "dd")


@torch.no_grad()
def _chunk_sums(qz, x: torch.Tensor, ratio: float, name: str) -> dict[str, float]:
    """The additive sums of one chunk of whole groups (a [rows, cols] slice of the view)."""
    q, grid = qz.quantize_with_grid(x, name=name)
    deq = qz.dequantize(q).reshape(-1).float()
    lower, upper = qz.cell_bounds_flat(q, grid)
    w = x.reshape(-1).float()
    v = qz.scale_view(x.reshape(-1))
    width = upper - lower
    free = (v != grid.cap_hi) & (v != grid.cap_lo) & (width > 0)
    dist = ((w - deq).abs() / width)[free]
    sums = {"n": float(dist.numel()), "distance": float(dist.double().sum()),
            "on_grid": float((dist < ON_GRID_TOL).sum()), "qd": 0.0, "dd": 0.0}
    for sign in (1.0, -1.0):  # the update +r b and -r b on every free weight; frozen ones stay, so the scales do
        delta = torch.where(free, sign * ratio * width, 0.0)
        moved = torch.minimum(torch.maximum(w + delta, grid.cap_lo), grid.cap_hi).to(x.dtype).reshape(x.shape)
        change = qz.round_trip(moved, name=name).reshape(-1).float() - deq
        sums["qd"] += float((change.double() * delta.double()).sum())
        sums["dd"] += float((delta.double() ** 2).sum())
    return sums


def tensor_sums(quantizer: str, view: torch.Tensor, *, ratio: float = RATIO, name: str = "tensor") -> dict[str, float]:
    """Sums over one weight (in the quantizer's view, 2-D [out, in]) of the free weights' count, distances, on-grid
    count and near-boundary counts, chunked by rows in multiples of 64 (so nf4/fp4 blocks stay whole)."""
    qz = get_quantizer(quantizer)
    x = view.detach().reshape(-1, view.shape[-1])
    rows, cols = x.shape
    step = max(64, (CHUNK_ELEMENTS // max(cols, 1)) // 64 * 64)
    total = dict.fromkeys(_SUMS, 0.0)
    for start in range(0, rows, step):
        for k, v in _chunk_sums(qz, x[start:start + step], ratio, name).items():
            total[k] += v
    return total


def _summary(sums: dict[str, float], ratio: float, fan_in: int | None) -> dict[str, Any]:
    n = sums["n"]
    if not n:
        return {"n": 0, "mean_distance": None, "frac_on_grid": None, "kept_fraction": None, "snr": None}
    k = sums["qd"] / sums["dd"] if sums["dd"] else 0.0
    out = {"n": int(n), "mean_distance": sums["distance"] / n, "frac_on_grid": sums["on_grid"] / n,
           "kept_fraction": k}
    if fan_in is not None:
        out.update(fan_in=fan_in, snr=math.sqrt(fan_in * k * ratio), snr_uniform=math.sqrt(fan_in * ratio))
    return out


def verdict_of(kept_fraction: float | None) -> Verdict | None:
    """The stated rule: 'undone' iff k(r) < KEPT_THRESHOLD (None without free weights)."""
    if kept_fraction is None:
        return None
    return "undone" if kept_fraction < KEPT_THRESHOLD else "kept"


def sentence(quantizer: str, overall: dict[str, Any], ratio: float) -> str:
    """The plain verdict line of one quantizer."""
    v = overall.get("verdict")
    if v is None:
        return f"{quantizer}: no weight of this model is quantizable by {quantizer}"
    what = "undone" if v == "undone" else "kept in expectation"
    return (f"{quantizer}: sub-bin forgetting on this model is expected to be {what} (k = "
            f"{overall['kept_fraction']:.2f} of a {ratio:g}-bin update survives; mean distance to the grid "
            f"{overall['mean_distance']:.3f} bin widths; median signal-to-noise per output "
            f"{overall['snr_median']:.1f})")


def grid_alignment(weights: Mapping[str, torch.Tensor], quantizers: Sequence[str], *, ratio: float = RATIO,
                   layout: QuantLayout = NATURAL) -> dict[str, Any]:
    """The diagnostic of `weights` ({name: parameter as stored}) under each quantizer (see the module docstring):
    {"kind", "ratio", "rule", "order" (the quantizers as asked; JSON objects get sorted),
     "quantizers": {q: {"overall": {..., "verdict", "sentence"}, "layers": [per tensor],
                        "skipped": [names q cannot quantize]}}}.  `layout` maps each name to q's view."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 0.5:
        raise ValueError(f"ratio (the sub-bin update in bin widths) must be in (0, 0.5], got {ratio!r}")
    out: dict[str, Any] = {"kind": KIND, "ratio": ratio, "rule": RULE, "order": list(quantizers), "quantizers": {}}
    for q in quantizers:
        qz = get_quantizer(q)
        rows, pooled, skipped = [], dict.fromkeys(_SUMS, 0.0), []
        for name, w in weights.items():
            view = layout.view(name, w.detach())
            if view.dim() != 2 or not fits(qz, view):
                skipped.append(name)
                continue
            sums = tensor_sums(q, view, ratio=ratio, name=name)
            pooled = {k: pooled[k] + sums[k] for k in _SUMS}
            rows.append({"name": name, "layer": layer_of(name), **_summary(sums, ratio, int(view.shape[-1]))})
        overall = _summary(pooled, ratio, None)
        snrs = sorted(r["snr"] for r in rows if r.get("snr") is not None)
        overall["snr_median"] = snrs[len(snrs) // 2] if snrs else None
        overall["verdict"] = verdict_of(overall["kept_fraction"])
        overall["sentence"] = sentence(q, overall, ratio)
        out["quantizers"][q] = {"overall": overall, "layers": rows, "skipped": skipped}
    return out


def diagnose_model(model: Any, quantizers: Sequence[str], *, ratio: float = RATIO) -> dict[str, Any]:
    """`grid_alignment` over a transformers model's quantizable weights (every Linear but the head), in each
    weight's quantizer view (Conv1D transposed)."""
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in quantizable_parameter_names(model)}
    return grid_alignment(weights, quantizers, ratio=ratio, layout=quant_layout(model))
