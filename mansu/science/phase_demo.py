"""The phase diagram on the demo model: one Adam-like step of controlled size on each base alignment.

For the demo model (mansu.data.demo) and its forget split, with g the gradient of the forget answers' negative
log-likelihood (cloze continuations) on the natural base:

    base_f   the model aligned as "nf4:f" (mansu.unlearn.nf4_model.align_base; f = 0 natural, 1 nf4-grid)
    delta    = eta sign(g) on every free quantizable weight (Adam's first step: equal absolute moves), eta set so
             that the median |delta| / bin width over those weights is rho; absmax weights frozen and moves clipped
             at the scale caps, as in mansu.science.phase, so NF4's scales never move
    acc      forget cloze accuracy of base_f + delta in fp and after NF4 (mansu.quant.twin.quantized)
    gap      (acc_NF4 - acc_fp) / (acc_base - acc_fp): the fraction of the facts forgotten in fp that NF4 brings
             back (the synthetic layer's gap, here over real facts); None when fp forgot < MIN_DROP
    pred     mansu.science.phase.predicted_gap(k, d, rho) with k = `mansu diagnose`'s pooled kept fraction of the
             base and d = the hidden size (the fan-in of most weights).  A fact's logit sums the level changes of
             many units and layers, so the effective d is larger and the noise smaller than that curve assumes.

The same update g is used on every base, so the bases differ only in where their weights sit in their cells.

Memory: the model, one copy of its natural quantizable weights and the gradient sign (1 B per weight as int8),
~9 B per quantizable weight beyond the model itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mansu.quant.registry import get_quantizer
from mansu.quant.targets import quant_layout

log = logging.getLogger(__name__)
DEMO_RATIOS = (0.1, 0.3, 0.7)
DEMO_FRACTIONS = (0.0, 0.5, 1.0)
K_ROWS = 128  # rows per weight for k: ~65k-260k weights each, whole NF4 blocks
MIN_DROP = 0.1  # fp forgetting below this leaves the gap's denominator too small to read


@dataclass(frozen=True)
class DemoPoint:
    fraction: float
    ratio: float
    acc_base: float
    acc_fp: float
    acc_nf4: float
    gap: float | None
    kept_pred: float
    gap_pred: float


def forget_gradient_sign(model, tokenizer, records) -> dict[str, torch.Tensor]:
    """sign of d(sum of the forget answers' NLL)/dW for every quantizable weight (int8, shaped like the weight)."""
    from mansu.metrics.accuracy import cloze_texts, encode_pair
    from mansu.unlearn.params import quantizable_names

    names = set(quantizable_names(model))
    model.zero_grad(set_to_none=True)
    for record in records:
        context, continuations = cloze_texts(record)
        ctx, cont = encode_pair(tokenizer, context, continuations[record.answer])
        ids = torch.tensor([ctx + cont])
        logits = model(input_ids=ids).logits[0, len(ctx) - 1: len(ctx) + len(cont) - 1]
        torch.nn.functional.cross_entropy(logits, torch.tensor(cont), reduction="sum").backward()
    signs = {n: p.grad.sign().to(torch.int8) for n, p in model.named_parameters() if n in names}
    model.zero_grad(set_to_none=True)
    return signs


@torch.no_grad()
def apply_step(model, natural: dict[str, torch.Tensor], signs: dict[str, torch.Tensor], fraction: float,
               ratio: float) -> None:
    """Write base_f + delta (the module docstring) into the model's quantizable weights."""
    from mansu.unlearn.nf4_model import align_base

    for n, p in model.named_parameters():
        if n in natural:
            p.copy_(natural[n])
    if fraction > 0:
        align_base(model, f"nf4:{fraction:g}")
    qz, layout = get_quantizer("nf4"), quant_layout(model)
    params = dict(model.named_parameters())
    geo = {n: _geometry(qz, layout.view(n, params[n].detach())) for n in signs}
    free_ratios = torch.cat([(1 / g[0][g[3]]) for g in geo.values()])  # |delta| / b per unit eta
    eta = ratio / float(free_ratios.median())
    for n, (_, lo, hi, free) in geo.items():
        w = layout.view(n, params[n].detach())
        step = torch.where(free, eta * layout.view(n, signs[n].float()), 0.0)  # ascent on the forget NLL
        params[n].copy_(layout.unview(n, torch.minimum(torch.maximum(w + step, lo), hi)))


def _geometry(qz, view: torch.Tensor):
    q, grid = qz.quantize_with_grid(view)
    lower, upper = (t.reshape(view.shape) for t in qz.cell_bounds_flat(q, grid))
    lo, hi = grid.cap_lo.reshape(view.shape), grid.cap_hi.reshape(view.shape)
    v = qz.scale_view(view)
    return upper - lower, lo, hi, (v != lo) & (v != hi) & (upper > lower)


def forget_accuracy(model, tokenizer, records) -> tuple[float, float]:
    """(fp, NF4) forget cloze accuracy.  NF4 by writing the round trip into the weights once and restoring them
    (mansu.unlearn.nf4_model.round_trip_in_place; the per-call twin re-rounds every weight on every batch)."""
    from mansu.metrics.accuracy import mcq_accuracy
    from mansu.unlearn.nf4_model import round_trip_in_place
    from mansu.unlearn.params import quantizable_names

    fp = mcq_accuracy(model, tokenizer, records, n_boot=1).accuracy
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in quantizable_names(model)}
    round_trip_in_place(model)
    try:
        q = mcq_accuracy(model, tokenizer, records, n_boot=1).accuracy
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
    return fp, q


def base_kept_fraction(model, ratio: float) -> float:
    """`mansu diagnose`'s pooled nf4 kept fraction k(ratio) over the model's quantizable weights (clamped at 0)."""
    from mansu.quant.diagnose import tensor_sums
    from mansu.unlearn.params import quantizable_names

    layout, params = quant_layout(model), dict(model.named_parameters())
    qd = dd = 0.0
    for n in quantizable_names(model):  # the first K_ROWS rows of each weight: k is a mean, it needs no more
        sums = tensor_sums("nf4", layout.view(n, params[n].detach())[:K_ROWS], ratio=ratio, name=n)
        qd, dd = qd + sums["qd"], dd + sums["dd"]
    return max(qd / dd, 0.0) if dd else 0.0


def demo_phase(model_dir: Path, forget_path: Path, *, ratios: Sequence[float] = DEMO_RATIOS,
               fractions: Sequence[float] = DEMO_FRACTIONS, progress=None) -> list[DemoPoint]:
    """Every (fraction, ratio) point on the demo model (module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mansu.data.records import load_records
    from mansu.science.phase import predicted_gap

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    records = load_records(forget_path)
    signs = forget_gradient_sign(model, tokenizer, records)
    natural = {n: p.detach().clone() for n, p in model.named_parameters() if n in signs}
    model.eval()
    d = int(model.config.hidden_size)
    points = []
    for f in fractions:
        apply_step(model, natural, signs, f, 0.0)
        acc_base = forget_accuracy(model, tokenizer, records)[0]
        for rho in ratios:
            k = base_kept_fraction(model, rho)
            apply_step(model, natural, signs, f, rho)
            fp, q = forget_accuracy(model, tokenizer, records)
            drop = acc_base - fp
            points.append(DemoPoint(f, rho, acc_base, fp, q, (q - fp) / drop if drop >= MIN_DROP else None,
                                    k, predicted_gap(k, d, rho)))
            apply_step(model, natural, signs, f, 0.0)
            if progress:
                progress(len(points), len(fractions) * len(ratios))
    return points
