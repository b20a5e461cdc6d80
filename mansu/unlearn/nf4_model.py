"""NF4-grid alignment of a base model (SPEC.md, last section), a named setting of every run:

    natural:   the weights as trained
    nf4-grid:  W <- dequant(quant_NF4(W)) for every quantizable Linear weight before unlearning (bit-exact with
               bitsandbytes, in blocks of the quantizer's view of each weight, mansu.quant.targets.QuantLayout:
               GPT-2's Conv1D weights transposed; head and norms untouched): the checkpoint a dequantized-NF4
               distribution, a QLoRA merge or QAT produces.  Written through `params.apply_update`, on the
               in-memory model only.
The NF4 twin used for evaluation is `mansu.quant.twin.nf4_twin`.
"""

from __future__ import annotations

from typing import Literal

import torch

from mansu.quant.nf4 import nf4_round_trip
from mansu.quant.targets import quant_layout
from mansu.unlearn.params import apply_update, full_masks, index_from_masks, quantizable_names

BaseAlignment = Literal["natural", "nf4-grid"]
ALIGNMENTS = ("natural", "nf4-grid")


def round_trip_in_place(model, blocksize: int = 64) -> None:
    """Replace every quantizable weight by its NF4 round trip, in blocks of the quantizer's view (Conv1D: W.T)."""
    names = quantizable_names(model)
    layout = quant_layout(model)
    index = index_from_masks(full_masks(model, names), model)
    params = dict(model.named_parameters())

    def moved(n: str) -> torch.Tensor:  # Q(W) - W in the parameter's layout, flat
        w = params[n].detach().cpu()
        rt = layout.unview(n, nf4_round_trip(layout.view(n, w), blocksize, name=n))
        return (rt.float() - w.float()).reshape(-1)

    apply_update(model, index, torch.cat([moved(n) for n in index.names]))


def align_base(model, alignment: str, blocksize: int = 64) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"base alignment {alignment!r} is not supported; accepted are {', '.join(ALIGNMENTS)}")
    if alignment == "nf4-grid":
        round_trip_in_place(model, blocksize)
