"""Grid alignment of a base model (SPEC.md, last section), a named setting of every run (mansu.quant.alignment
parses it and holds the equation):

    natural:          the weights as trained
    nf4-grid (nf4):   W <- dequant(quant_NF4(W)) for every quantizable Linear weight before unlearning (bit-exact
                      with bitsandbytes), the checkpoint a dequantized-NF4 distribution, a QLoRA merge or QAT gives
    <q>, <q>:<f>:     the same on any registered quantizer's grid, on all of its groups or a seeded fraction f

Blocks are formed on the quantizer's view of each weight (mansu.quant.targets.QuantLayout: GPT-2's Conv1D weights
transposed; head and norms untouched), on the in-memory model only.  The aligned values are written, not added:
`params.apply_update` adds a delta, and fl(W + (RT(W) - W)) is not RT(W) when the level is much smaller than the
weight (fp4's 1/192 level, a zero point), so an additive write would leave weights a few ulps off the grid.  This
module's `_write` is the one other parameter write in mansu, and only for base alignment.  The quantized twins used
for evaluation are in mansu.quant.twin.
"""

from __future__ import annotations

import logging

import torch

from mansu.quant.alignment import ALIGNMENT_SEED, aligned_view, describe, fits, parse_alignment
from mansu.quant.registry import get_quantizer
from mansu.quant.targets import quant_layout
from mansu.unlearn.params import quantizable_names

log = logging.getLogger(__name__)


def round_trip_in_place(model, blocksize: int = 64, *, quantizer: str = "nf4", fraction: float = 1.0,
                        seed: int = ALIGNMENT_SEED) -> list[str]:
    """Replace every quantizable weight (or a seeded `fraction` of its quantizer groups) by its round trip through
    `quantizer`, in the quantizer's view (Conv1D: W.T).  Returns the names left as they are because the
    quantizer cannot quantize their shape (int4-g128 with rows not a multiple of 128)."""
    qz = get_quantizer(quantizer)
    layout = quant_layout(model)
    params = dict(model.named_parameters())
    names, skipped = [], []
    for n in quantizable_names(model):
        (names if fits(qz, layout.view(n, params[n].detach())) else skipped).append(n)
    for i, n in enumerate(names):  # the seed of a tensor's groups is its position among the aligned weights
        w = params[n].detach()
        view = aligned_view(qz, layout.view(n, w), fraction, seed=seed + i, blocksize=blocksize, name=n)
        _write(params[n], layout.unview(n, view))
    if skipped:
        log.warning("%s alignment left %d weight(s) natural (shape not quantizable): %s", quantizer, len(skipped),
                    ", ".join(skipped))
    return skipped


@torch.no_grad()
def _write(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


def align_base(model, alignment: str, blocksize: int = 64) -> list[str]:
    """Align `model`'s quantizable weights as the setting `alignment` says (mansu.quant.alignment.parse_alignment:
    natural, nf4-grid, <quantizer>, <quantizer>:<fraction>); returns the weights left natural."""
    parsed = parse_alignment(alignment)
    if parsed.is_natural:
        return []
    log.info("base alignment %s: %s", alignment, describe(parsed))
    return round_trip_in_place(model, blocksize, quantizer=parsed.quantizer, fraction=parsed.fraction)
