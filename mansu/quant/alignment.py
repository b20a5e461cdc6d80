"""Base alignment to a quantizer's grid (SPEC.md, "Where the reversal does appear"): the setting's grammar, and the
aligned weight of one tensor.

A base alignment is one string, parsed by `parse_alignment` (the one validator; RunSpec, the CLI and the pipeline
all call it):

    natural          the weights as trained
    nf4-grid         every quantizable weight replaced by its NF4 round trip (the same as nf4:1)
    <q>, <q>-grid    the same for any registered quantizer q (mansu.quant.registry.QUANTIZERS)
    <q>:<f>          a seeded random fraction f in (0, 1] of q's groups (blocks) aligned, the rest left natural

For a weight W (in the quantizer's view, mansu.quant.targets) and a group mask m (1 B per weight), the aligned
weight is

    W' = where(m, RT_q(W), W),    RT_q = q.dequantize(q.quantize(W)),

exact per group: a group's quantized values depend only on its own elements (its scales), so an aligned group is
bit-identical to the same group of the full round trip and an unaligned one is untouched.  The groups are the
quantizer's: 64 flat elements for nf4 and fp4 (`blocksize` for nf4), a row for int8, 128 consecutive elements of a
row for int4-g128.  Exactly round(f x n_groups) groups of each tensor are aligned, drawn with
torch.randperm(seeded by `seed` + the tensor's position in the model), so a setting names one base.

A quantizer that cannot quantize a tensor (int4-g128 on rows that are not a multiple of 128) leaves it as it is:
`fits` says which; deployment tools keep such layers in full precision too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mansu.quant.base import Quantizer
from mansu.quant.nf4 import DEFAULT_BLOCKSIZE, nf4_round_trip
from mansu.quant.quantizers.int4 import Int4G128
from mansu.quant.registry import CALIBRATED_QUANTIZERS, EVAL_QUANTIZERS, QUANTIZERS, get_quantizer

NATURAL = "natural"
ALIGNMENT_FORMS = ("natural", "nf4-grid", "<quantizer>", "<quantizer>-grid", "<quantizer>:<fraction in (0, 1]>")
ALIGNMENT_SEED = 0  # fixed, so that "nf4:0.5" is one base that runs (and compare's shared cache) agree on


@dataclass(frozen=True)
class Alignment:
    """A parsed base alignment: no quantizer (natural), or a quantizer and the fraction of its groups aligned."""
    quantizer: str | None
    fraction: float = 1.0

    @property
    def is_natural(self) -> bool:
        return self.quantizer is None


def _alignment_error(text: object, why: str) -> ValueError:
    return ValueError(f"base alignment {text!r} {why}; accepted forms are {', '.join(ALIGNMENT_FORMS)} "
                      f"with a quantizer among {', '.join(QUANTIZERS)} (e.g. nf4-grid, int4-g128, nf4:0.5)")


def parse_alignment(text: str) -> Alignment:
    """The Alignment a setting names; ValueError listing the accepted forms otherwise."""
    if not isinstance(text, str):
        raise _alignment_error(text, "is not a string")
    t = text.strip()
    if t == NATURAL:
        return Alignment(None)
    name, sep, frac_text = t.partition(":")
    name = name[: -len("-grid")] if name.endswith("-grid") and name[: -len("-grid")] in QUANTIZERS else name
    if name not in QUANTIZERS:
        raise _alignment_error(text, "names no registered quantizer")
    if not sep:
        return Alignment(name, 1.0)
    try:
        fraction = float(frac_text)
    except ValueError:
        raise _alignment_error(text, f"has a fraction {frac_text!r} that is not a number") from None
    if not 0.0 < fraction <= 1.0:
        raise _alignment_error(text, f"has a fraction {fraction:g} outside (0, 1]")
    return Alignment(name, fraction)


def fits(qz: Quantizer, view: torch.Tensor) -> bool:
    """Whether `qz` can quantize a weight of this view's shape (int4-g128 needs rows of a multiple of 128)."""
    return not (isinstance(qz, Int4G128) and view.shape[-1] % qz.group_size)


def round_trip(qz: Quantizer, view: torch.Tensor, *, blocksize: int = DEFAULT_BLOCKSIZE,
               name: str = "tensor") -> torch.Tensor:
    """RT_q(view) in the view's dtype; nf4 honours `blocksize` (the registry's nf4 is blocksize 64)."""
    if qz.name == "nf4" and blocksize != DEFAULT_BLOCKSIZE:
        return nf4_round_trip(view, blocksize, name=name)
    return qz.round_trip(view, name=name)


def group_mask(qz: Quantizer, shape: torch.Size, fraction: float, generator: torch.Generator, *,
               blocksize: int = DEFAULT_BLOCKSIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool mask shaped like the view (1 B per weight): round(fraction x n_groups) of qz's groups, seeded."""
    cols = shape[-1] if len(shape) else 1
    numel = int(torch.Size(shape).numel())
    rows = numel // max(cols, 1)
    if qz.name == "int8":
        n, expand = rows, (lambda g: g[:, None].expand(rows, cols))
    elif qz.name == "int4-g128":
        per_row = cols // qz.group_size
        n = rows * per_row
        expand = (lambda g: g.reshape(rows, per_row).repeat_interleave(qz.group_size, dim=1))
    else:  # nf4, fp4: flat blocks of the view, the last one possibly partial
        size = blocksize if qz.name == "nf4" else qz.group_size
        n = -(-numel // size)
        expand = (lambda g: g.repeat_interleave(size)[:numel])
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    return expand(chosen).reshape(shape).to(device)


def aligned_view(qz: Quantizer, view: torch.Tensor, fraction: float, *, seed: int = ALIGNMENT_SEED,
                 blocksize: int = DEFAULT_BLOCKSIZE, name: str = "tensor") -> torch.Tensor:
    """W' = where(mask, RT_q(W), W) for one view (a new tensor; `view` itself is not modified)."""
    rt = round_trip(qz, view.detach(), blocksize=blocksize, name=name)
    if fraction >= 1.0:
        return rt
    gen = torch.Generator().manual_seed(seed)
    return torch.where(group_mask(qz, view.shape, fraction, gen, blocksize=blocksize, device=view.device), rt,
                       view.detach())


def describe(alignment: Alignment) -> str:
    """A short phrase for logs and docs."""
    if alignment.is_natural:
        return "natural (the weights as trained)"
    part = "every" if alignment.fraction >= 1.0 else f"{alignment.fraction:g} of the"
    return f"{part} {get_quantizer(alignment.quantizer).name} group(s) snapped to their round trip"


DEFAULT_QUANTIZERS = ",".join(QUANTIZERS)  # every registered grid: what a run's eval stage scores by default
ALIGNMENT_PRESETS: tuple[str, ...] = (NATURAL, *(f"{q}-grid" for q in QUANTIZERS))  # what a picker offers


def parse_quantizers(text: str, *, calibrated: bool = False) -> list[str]:
    """The registered quantizers a comma-separated list names, in order, without repeats; ValueError naming the
    valid ones otherwise.  `calibrated` also accepts the evaluation-only calibrated quantizers (RunSpec.quantizers,
    `eval --quant`); without it (the floor, diagnose) a calibrated one is refused: it has no grid geometry."""
    valid = EVAL_QUANTIZERS if calibrated else tuple(QUANTIZERS)
    if not isinstance(text, str):
        raise ValueError(f"quantizers must be a comma-separated string, got {text!r}")
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError(f"quantizers {text!r} names none; give a comma-separated list of {', '.join(valid)}")
    for name in names:
        if name in CALIBRATED_QUANTIZERS and not calibrated:
            raise ValueError(f"{name} is calibrated (its codes are not round-to-nearest), so it has no bin widths or "
                             f"minimum moves to floor or diagnose against; use {CALIBRATED_QUANTIZERS[name]}, the "
                             f"grid it writes onto (it is accepted by `eval --quant` and a run's quantizers)")
        if name not in valid:
            raise ValueError(f"unknown quantizer {name!r} in {text!r}; choose among {', '.join(valid)}")
    return names
