"""Survival of an update under NF4, and how grid-aligned a model's weights are.

For a quantized tensor with weights theta, update delta (theta' = theta + delta), Q = NF4 round trip (in the
weights' dtype, computed in fp32 here), q = Q(theta') - Q(theta), bin_i the bin width of theta_i
(mansu.quant.geometry) and U = {i : delta_i != 0} the updated weights:

    ratio_i          = |delta_i| / bin_i  over i in U      (quantiles 5/25/50/75/95; "the median update is
                                                            N x below the bin width" with N = 1 / median)
    frac_code_changed    = |{i in U : code(theta'_i) != code(theta_i)}| / |U|
    frac_dequant_changed = |{i in U : q_i != 0}| / |U|
    kept_fraction    k   = <q, delta> / ||delta||^2         (1: NF4 keeps the update in expectation; 0: erased)
    snr                  = k / se(k),   se(k)^2 = sum_i delta_i^2 e_i^2 / ||delta||^4,   e = q - k delta
    sign_agreement       = |{i : q_i delta_i > 0}| / |{i : q_i != 0 and delta_i != 0}|

k is the least-squares coefficient of q on delta; e is the part of the quantized change orthogonal to delta
(the dither noise) and se(k) its heteroscedasticity-consistent (HC0) standard error, so snr measures how clearly
the quantized change carries the update.  For a coherent update of r bin widths spread over n weights it grows
like sqrt(n r) (SPEC, "What we measured about sub-bin updates").  Over a whole tensor n is large, so we also
report `row_snr_median`: the same statistic per output row of a 2-D weight (n = fan-in d: the signal reaching
one output unit), the median over rows that have updates.  The sums (<q, delta>, ||delta||^2, sum d^2 q^2,
sum d^3 q, sum d^4) are additive, so layer and overall values are exact pools of their tensors.

All sums run over every element of the tensor, not only U: weights of a block whose absmax changed can change code
without being updated; `n_code_changed_not_updated` counts them.  Quantiles are exact while the updated weights
number at most QUANTILE_SAMPLE; beyond that they come from a seeded uniform sample (with replacement) of about that
many ratios, the same rate for every tensor, so layer and overall pools stay uniform; histograms are always exact
counts.

Alignment (how far weights sit from the NF4 grid): a_i = |theta_i - L[code_i] * absmax_b| / bin_i, the distance
to the level the weight rounds to, in bin widths, over the non-absmax weights of non-zero blocks (the absmax
element always sits on level +-1).  A natural fp32 base has a_i spread over [0, ~0.6] (mean about 0.25); a
base stored as dequantized NF4 has a_i ~ 0 (fp32 rounding); `frac_on_grid` counts a_i < ON_GRID_TOL.

Blocks (and output rows) are those of the quantizer's view of each tensor, `layout` (mansu.quant.targets): GPT-2's
Conv1D weights are stored [in, out] but quantized as W.T, [out, in], like every nn.Linear.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mansu.io import read_json, write_json_atomic
from mansu.quant.geometry import element_absmax, quantize_with_bin_width
from mansu.quant.nf4 import (
    DEFAULT_BLOCKSIZE,
    block_absmax,
    cell_widths_scaled,
    chunk_step,
    codes_from_scaled,
    mul_by_block,
    nf4_levels,
    run_chunks,
    scale_by_block,
    validate_blocksize,
    validate_weight,
)
from mansu.quant.targets import NATURAL, QuantLayout

KIND = "nf4_survival"
ALIGNMENT_KIND = "nf4_alignment"
QUANTILES = (5, 25, 50, 75, 95)
HIST_LOW, HIST_HIGH, HIST_BINS = 1e-4, 1e2, 60  # log-spaced |delta|/bin bins, plus an underflow and overflow bin
ALIGN_BINS = 50  # linear bins of the alignment distance over [0, 1]
ON_GRID_TOL = 1e-3  # a weight within 0.001 bin widths of its level counts as on the grid
QUANTILE_SAMPLE = 1 << 18  # quantiles from at most this many ratios (seeded uniform thinning beyond): sort cost
_LAYER_RE = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")
_SUMS = ("n_weights", "n_updated", "n_code_changed_updated", "n_dequant_changed_updated",
         "n_code_changed_not_updated", "n_sign_agree", "n_sign_both", "qd", "dd", "d2q2", "d3q", "d4")


def layer_of(name: str) -> str:
    """The decoder layer index in a parameter name ("model.layers.3.mlp..." -> "3"), else "other"."""
    m = _LAYER_RE.search(name)
    return m.group(1) if m else "other"


def histogram_edges() -> list[float]:
    """The HIST_BINS + 1 log-spaced edges of the |delta|/bin histogram (counts have two more: under, over)."""
    return torch.logspace(math.log10(HIST_LOW), math.log10(HIST_HIGH), HIST_BINS + 1, dtype=torch.float64).tolist()


def _hist(ratios: torch.Tensor) -> torch.Tensor:
    """Counts [HIST_BINS + 2]: [< low, the HIST_BINS log bins (left-closed), >= high (inf included)].

    Bin index = floor((log10 r - log10 low) * HIST_BINS / decades) + 1, clamped; computed arithmetically (not
    with torch.bucketize, whose tiny grain size would start OpenMP teams inside the chunk workers)."""
    decades = math.log10(HIST_HIGH) - math.log10(HIST_LOW)
    u = (ratios.log10() - math.log10(HIST_LOW)).mul_(HIST_BINS / decades).floor_().add_(1)
    idx = u.clamp_(0, HIST_BINS + 1).to(torch.int64)
    return torch.bincount(idx, minlength=HIST_BINS + 2)


def _quantiles(x: torch.Tensor) -> dict[str, float | None]:
    """Linear-interpolated percentiles QUANTILES of a 1-D tensor (None when empty); inf stays inf."""
    if x.numel() == 0:
        return {str(p): None for p in QUANTILES}
    s = x.sort().values
    out = {}
    for p in QUANTILES:
        pos = p / 100 * (s.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        a, b = float(s[lo]), float(s[hi])
        out[str(p)] = a if lo == hi or a == b else a + (b - a) * (pos - lo)
    return out


_PRODUCTS = ("qd", "dd", "d2q2", "d3q", "d4")


def _chunk_pass(x0: torch.Tensor, x1: torch.Tensor, start: int, cols: int, blocksize: int, dtype: torch.dtype,
                widths: torch.Tensor, levels: torch.Tensor) -> dict[str, Any] | None:
    """Statistics of one block-aligned chunk (None if it holds a NaN/Inf).  Every op is below torch's grain size,
    so it runs inline in the calling pool thread."""
    if not (bool(torch.isfinite(x0).all()) and bool(torch.isfinite(x1).all())):
        return None
    a0, a1 = block_absmax(x0, blocksize), block_absmax(x1, blocksize)
    c0 = codes_from_scaled(scale_by_block(x0, a0, blocksize))
    c1 = codes_from_scaled(scale_by_block(x1, a1, blocksize))
    width = torch.index_select(widths, 0, c0)
    mul_by_block(width, a0, blocksize)
    deq0, deq1 = torch.index_select(levels, 0, c0), torch.index_select(levels, 0, c1)
    mul_by_block(deq0, a0, blocksize)
    mul_by_block(deq1, a1, blocksize)
    # float64: the difference is exact and d^4 of a 1e-10 update does not underflow
    d = x1.double() - x0.double()
    qd = deq1.to(dtype).double() - deq0.to(dtype).double()  # the model computes with dequantized values in its dtype
    upd, changed, dq_nz = d != 0, c0 != c1, qd != 0
    both = upd & dq_nz
    d2, qdd = d * d, qd * d
    prods = torch.stack([qdd, d2, qdd * qdd, qdd * d2, d2 * d2])  # [5, chunk]
    ratios = (d[upd].abs() / width[upd]).float()  # a zero-width cell (all-zero block) gives inf
    out = {
        "n_weights": d.numel(), "n_updated": int(upd.sum()), "n_code_changed_updated": int((changed & upd).sum()),
        "n_dequant_changed_updated": int(both.sum()), "n_code_changed_not_updated": int((changed & ~upd).sum()),
        "n_sign_agree": int((qdd > 0).sum()), "n_sign_both": int(both.sum()),
        **dict(zip(_PRODUCTS, prods.sum(1).tolist())), "ratios": ratios.cpu(), "hist": _hist(ratios).cpu(),
    }
    if cols:  # per-row partial sums of the 5 products for the row SNR
        local = torch.arange(start, start + d.numel(), device=d.device) // cols - start // cols
        n_rows = int(local[-1]) + 1
        out["row0"] = start // cols
        out["rows"] = torch.zeros(5, n_rows, dtype=torch.float64, device=d.device).index_add_(1, local, prods).cpu()
    return out


def _tensor_pass(w0: torch.Tensor, w1: torch.Tensor, name: str, blocksize: int):
    """Sums, the ratios of updated weights, per-row SNRs and the histogram of one tensor, in parallel chunks."""
    validate_weight(w0, name, blocksize, check_finite=False)
    validate_weight(w1, name, blocksize, check_finite=False)
    x0, x1 = w0.detach().reshape(-1), w1.detach().reshape(-1)
    n = x0.numel()
    cols = int(w0.shape[-1]) if w0.ndim == 2 else 0
    step = chunk_step(blocksize, n, x0.device)
    widths, levels = cell_widths_scaled(x0.device), nf4_levels(x0.device)

    def work(start: int):
        stop = min(start + step, n)
        return _chunk_pass(x0[start:stop], x1[start:stop], start, cols, blocksize, w0.dtype, widths, levels)

    parts = run_chunks(work, range(0, n, step))
    if any(p is None for p in parts):
        validate_weight(w0, name, blocksize)
        validate_weight(w1, name, blocksize)  # one of them raises with the NaN / Inf counts
    sums = {key: sum(p[key] for p in parts) for key in _SUMS}
    ratios = torch.cat([p["ratios"] for p in parts])
    hist = torch.stack([p["hist"] for p in parts]).sum(0)
    row_snr = torch.empty(0)
    if cols:
        rows = torch.zeros(5, w0.shape[0], dtype=torch.float64)
        for p in parts:
            rows[:, p["row0"] : p["row0"] + p["rows"].shape[1]] += p["rows"]
        row_snr = _row_snr(rows)
    return sums, ratios.cpu(), row_snr.cpu(), hist.cpu()  # pooled on the CPU: a tensor's work stays on its device


def _sample(r: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """round(rate * len(r)) values drawn uniformly with replacement (cheap; fine for quantile estimates)."""
    k = round(rate * r.numel())
    return r[torch.randint(0, r.numel(), (k,), generator=gen)] if k else r[:0]


def _snr_from_sums(qd: float, dd: float, d2q2: float, d3q: float, d4: float) -> tuple[float | None, float | None]:
    """(k, snr) from the additive sums; None where undefined (no update / no noise and no signal)."""
    if dd == 0:
        return None, None
    k = qd / dd
    var_num = max(d2q2 - 2 * k * d3q + k * k * d4, 0.0)  # sum d^2 (q - k d)^2
    if var_num == 0:
        return k, (None if k == 0 else math.inf)
    return k, k / (math.sqrt(var_num) / dd)


def _row_snr(rows: torch.Tensor) -> torch.Tensor:
    """Per output row, from its 5 product sums [5, rows] (float64): the snr above with n = the row's weights
    (rows without updates dropped; nan where there is neither signal nor noise)."""
    qd, dd, d2q2, d3q, d4 = rows[:, rows[1] > 0]
    k = qd / dd
    se = (d2q2 - 2 * k * d3q + k * k * d4).clamp(min=0).sqrt() / dd
    return torch.where(se > 0, k / se, torch.where(k == 0, torch.nan, torch.inf)).float()


def _summarize(sums: dict[str, float], ratios: torch.Tensor, hist: torch.Tensor, row_snr: torch.Tensor,
               ratios_exact: bool) -> dict[str, Any]:
    """The JSON record of a group (tensor, layer or overall) from its pooled pieces."""
    n_upd = sums["n_updated"]
    k, snr = _snr_from_sums(sums["qd"], sums["dd"], sums["d2q2"], sums["d3q"], sums["d4"])
    quant = _quantiles(ratios)
    med = quant["50"]
    finite_rows = row_snr[~torch.isnan(row_snr)]
    return {
        **{key: int(sums[key]) for key in _SUMS if key.startswith("n_")},
        "fraction_updated": n_upd / sums["n_weights"] if sums["n_weights"] else None,
        "ratio_quantiles": quant, "ratio_quantiles_exact": ratios_exact, "median_ratio": med,
        "times_below_bin": (1.0 / med) if med else None,
        "frac_code_changed": sums["n_code_changed_updated"] / n_upd if n_upd else None,
        "frac_dequant_changed": sums["n_dequant_changed_updated"] / n_upd if n_upd else None,
        "kept_fraction": k, "snr": snr,
        "row_snr_median": float(finite_rows.median()) if finite_rows.numel() else None,
        "sign_agreement": sums["n_sign_agree"] / sums["n_sign_both"] if sums["n_sign_both"] else None,
        "histogram": hist.tolist(),
    }


def _resolve_names(theta: Mapping[str, torch.Tensor], theta_new: Mapping[str, torch.Tensor],
                   names: Sequence[str] | None) -> list[str]:
    if names is None:
        names = [n for n, t in theta.items() if t.ndim == 2 and t.is_floating_point() and n in theta_new]
    if not names:
        raise ValueError("no tensors to analyse: pass names=quantizable_parameter_names(model) "
                         "(2-D float tensors present in both state dicts)")
    for n in names:
        if n not in theta or n not in theta_new:
            raise ValueError(f"{n}: not in both state dicts; names must be keys of theta and theta_new")
        if theta[n].shape != theta_new[n].shape:
            raise ValueError(f"{n}: shape {tuple(theta[n].shape)} before vs {tuple(theta_new[n].shape)} after; "
                             "an update must keep shapes")
    return list(names)


def survival_analysis(theta: Mapping[str, torch.Tensor], theta_new: Mapping[str, torch.Tensor],
                      names: Sequence[str] | None = None, *, blocksize: int = DEFAULT_BLOCKSIZE,
                      seed: int = 0, layout: QuantLayout = NATURAL) -> dict[str, Any]:
    """Survival of theta_new - theta under NF4, per tensor, per layer and overall (see the module docstring).

    `names` are the quantized tensors (use `quantizable_parameter_names(model)`); None takes every 2-D float
    tensor present in both.  `layout` (`quant_layout(model)`) gives the quantizer's view of each tensor: blocks
    and rows are those of bitsandbytes' [out, in] layout (GPT-2's Conv1D weights are quantized transposed).
    Returns a JSON-ready dict: {"kind", "blocksize", "transposed", "histogram_edges", "quantiles", "overall",
    "layers": {layer: record}, "tensors": {name: record}, "headline"}.
    """
    validate_blocksize(blocksize, "survival_analysis")
    names = _resolve_names(theta, theta_new, names)
    per = {n: _tensor_pass(layout.view(n, theta[n]), layout.view(n, theta_new[n]), n, blocksize) for n in names}
    total_upd = sum(s["n_updated"] for s, _, _, _ in per.values())
    rate = min(1.0, QUANTILE_SAMPLE / total_upd) if total_upd else 1.0
    gen = torch.Generator().manual_seed(seed)
    samples = {n: r if rate >= 1.0 else _sample(r, rate, gen) for n, (_, r, _, _) in per.items()}
    exact = rate >= 1.0
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_of(n), []).append(n)

    def pooled(members: list[str]) -> dict[str, Any]:
        sums = {key: sum(per[m][0][key] for m in members) for key in _SUMS}
        hist = torch.stack([per[m][3] for m in members]).sum(0)
        ratios = torch.cat([samples[m] for m in members])
        return _summarize(sums, ratios, hist, torch.cat([per[m][2] for m in members]), exact)

    report = {
        "kind": KIND, "blocksize": blocksize, "transposed": sorted(n for n in names if layout.is_transposed(n)),
        "histogram_edges": histogram_edges(), "quantiles": list(QUANTILES),
        "tensors": {n: pooled([n]) for n in names},
        "layers": {layer: pooled(members) for layer, members in groups.items()},
        "overall": pooled(names),
    }
    report["headline"] = headline(report["overall"])
    return report


def headline(record: Mapping[str, Any]) -> str:
    """One sentence for a survival record: how far below the bin width the median update is, and what NF4 kept."""
    if not record.get("n_updated"):
        return "no weight was updated"
    n, k, fc = record["times_below_bin"], record["kept_fraction"], record["frac_code_changed"]
    size = f"the median update is {n:.3g}x below the NF4 bin width" if n and n >= 1 else \
        f"the median update is {record['median_ratio']:.3g} bin widths"
    return f"{size}; {100 * fc:.3g}% of updated weights changed code; NF4 keeps {k:.3g} of the update"


def alignment_report(state: Mapping[str, torch.Tensor], names: Sequence[str] | None = None, *,
                     blocksize: int = DEFAULT_BLOCKSIZE, layout: QuantLayout = NATURAL) -> dict[str, Any]:
    """Distance of each weight to its NF4 level in bin widths: per tensor and overall (see module docstring),
    on the quantizer's view of each tensor (`layout` = `quant_layout(model)`; GPT-2's Conv1D weights transposed)."""
    validate_blocksize(blocksize, "alignment_report")
    names = _resolve_names(state, state, names)
    tensors, total_hist = {}, torch.zeros(ALIGN_BINS, dtype=torch.int64)
    total_sum, total_n, total_on = 0.0, 0, 0
    for n in names:
        dist = _alignment_distances(layout.view(n, state[n]), n, blocksize)
        hist = torch.histc(dist.clamp(max=1.0), bins=ALIGN_BINS, min=0.0, max=1.0).long().cpu()
        on = int((dist < ON_GRID_TOL).sum())
        tensors[n] = _align_record(float(dist.double().sum()), dist.numel(), on, hist)
        total_hist += hist
        total_sum, total_n, total_on = total_sum + float(dist.double().sum()), total_n + dist.numel(), total_on + on
    return {"kind": ALIGNMENT_KIND, "blocksize": blocksize,
            "transposed": sorted(n for n in names if layout.is_transposed(n)),
            "bin_edges": torch.linspace(0, 1, ALIGN_BINS + 1).tolist(),
            "on_grid_tol": ON_GRID_TOL, "tensors": tensors,
            "overall": _align_record(total_sum, total_n, total_on, total_hist)}


def _alignment_distances(w: torch.Tensor, name: str, blocksize: int) -> torch.Tensor:
    q, width = quantize_with_bin_width(w, blocksize, name=name)
    a = element_absmax(q)
    x = w.detach().reshape(-1).float()
    keep = (x.abs() != a) & (a > 0)
    level = nf4_levels(a.device)[q.codes.long()] * a
    return ((x - level).abs() / width.reshape(-1))[keep]


def _align_record(total: float, n: int, on: int, hist: torch.Tensor) -> dict[str, Any]:
    return {"n_weights": n, "mean_distance": total / n if n else None,
            "frac_on_grid": on / n if n else None, "histogram": hist.tolist()}


def write_survival(path: Path, report: Mapping[str, Any]) -> None:
    """Save a survival (or alignment) report as stamped JSON, atomically."""
    write_json_atomic(Path(path), dict(report), add_stamp=True)


def load_survival(path: Path) -> dict[str, Any]:
    """Read a report written by `write_survival`; raises ValueError if the file is not one."""
    report = read_json(Path(path))
    if not isinstance(report, dict) or report.get("kind") not in (KIND, ALIGNMENT_KIND):
        raise ValueError(f"{path}: not an NF4 survival report (expected kind {KIND!r} or {ALIGNMENT_KIND!r})")
    return report
