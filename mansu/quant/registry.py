"""The one list of quantizers: every CLI choice, app picker, validator and table derives from QUANTIZERS.

Adding a quantizer is one module in mansu/quant/quantizers/ (a mansu.quant.base.Quantizer subclass, tested
bit-exact against its library in tests/test_quantizers.py) plus one line here.  Calibrated quantizers (GPTQ)
are listed apart: they can be scored but have no grid geometry.  Importing this module imports
torch but no quantization library: those are only needed by the tests and benches that compare against them.
"""

from __future__ import annotations

from typing import Literal

from mansu.quant.base import Quantizer
from mansu.quant.quantizers.fp4 import FP4
from mansu.quant.quantizers.int4 import Int4G128
from mansu.quant.quantizers.int8 import Int8
from mansu.quant.quantizers.nf4 import NF4

QuantizerName = Literal["nf4", "fp4", "int8", "int4-g128"]
QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (NF4(), FP4(), Int8(), Int4G128())}
DEFAULT_QUANTIZER: QuantizerName = "nf4"

# Calibrated quantizers (evaluation only, never in the default list): their codes are not the grid's nearest level,
# so they have no bin widths or minimum moves; each maps to the round-to-nearest grid it writes onto.
GPTQ = "gptq-int4-g128"  # llmcompressor GPTQ in a side environment (mansu.quant.gptq)
CALIBRATED_QUANTIZERS: dict[str, str] = {GPTQ: "int4-g128"}
EVAL_QUANTIZERS: tuple[str, ...] = (*QUANTIZERS, *CALIBRATED_QUANTIZERS)  # what `eval --quant` and a run may score


def get_quantizer(name: str) -> Quantizer:
    """The registered quantizer called `name`; ValueError listing the valid names otherwise."""
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {', '.join(QUANTIZERS)}") from None
