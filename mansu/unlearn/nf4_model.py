"""Model-level NF4 helpers the pipeline needs: the simulated NF4 twin and NF4-grid alignment of a base.

    twin:      W_q = dequant(quant_NF4(W)) for every quantizable Linear weight (bit-exact with bitsandbytes'
               dequantize; the head and norms stay full precision, as transformers' bnb loader leaves them)
    alignment: the same replacement applied to the base before unlearning ("nf4-grid" base, SPEC.md last
               section): the checkpoint a dequantized-NF4 distribution or a QLoRA merge produces.
Both write through `params.apply_update`.  `mansu.quant.twin` (real bitsandbytes) is used when asked for.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from mansu.unlearn.params import apply_update, full_masks, index_from_masks, quantizable_names

BaseAlignment = Literal["natural", "nf4-grid"]
ALIGNMENTS = ("natural", "nf4-grid")


def round_trip_in_place(model, blocksize: int = 64) -> None:
    """Replace every quantizable weight by its NF4 round trip."""
    from mansu.quant.nf4 import nf4_round_trip

    names = quantizable_names(model)
    index = index_from_masks(full_masks(model, names), model)
    params = dict(model.named_parameters())
    delta = torch.cat([(nf4_round_trip(params[n].detach().cpu(), blocksize, name=n).float()
                        - params[n].detach().cpu().float()).reshape(-1) for n in index.names])
    apply_update(model, index, delta)


def nf4_twin(model, blocksize: int = 64):
    """A deep copy of `model` computing with NF4-dequantized weights (the original is untouched)."""
    twin = copy.deepcopy(model)
    round_trip_in_place(twin, blocksize)
    return twin


def align_base(model, alignment: str, blocksize: int = 64) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"base alignment {alignment!r} is not supported; accepted are {', '.join(ALIGNMENTS)}")
    if alignment == "nf4-grid":
        round_trip_in_place(model, blocksize)


def grid_distance(model, blocksize: int = 64) -> float:
    """Median over quantizable weights of |w - dequant(quant(w))| / bin width: 0 on an NF4-grid base, ~0.25 natural."""
    from mansu.quant.geometry import bin_width
    from mansu.quant.nf4 import nf4_round_trip

    vals = []
    for name, p in model.named_parameters():
        if name in set(quantizable_names(model)):
            w = p.detach().cpu()
            d = (w.float() - nf4_round_trip(w, blocksize).float()).abs() / bin_width(w, blocksize).clamp(min=1e-30)
            vals.append(d.reshape(-1)[:: max(1, d.numel() // 20000)])
    return float(torch.cat(vals).median()) if vals else 0.0
