"""NF4-grid alignment of a base model (SPEC.md, last section), a named setting of every run:

    natural:   the weights as trained
    nf4-grid:  W <- dequant(quant_NF4(W)) for every quantizable Linear weight before unlearning (bit-exact with
               bitsandbytes; head and norms untouched): the checkpoint a dequantized-NF4 distribution, a QLoRA
               merge or QAT produces.  Written through `params.apply_update`, on the in-memory model only.
The NF4 twin used for evaluation is `mansu.quant.twin.nf4_twin`.
"""

from __future__ import annotations

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


def align_base(model, alignment: str, blocksize: int = 64) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"base alignment {alignment!r} is not supported; accepted are {', '.join(ALIGNMENTS)}")
    if alignment == "nf4-grid":
        round_trip_in_place(model, blocksize)
