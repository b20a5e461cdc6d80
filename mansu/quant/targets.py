"""Which weights NF4 quantizes, and the layout the quantizer sees them in.

transformers (`replace_with_bnb_linear`) converts every module whose type is exactly `nn.Linear` (or GPT-2's
`Conv1D`) unless its name matches `get_keys_to_not_convert(model)`: tied weights, the last parameter's module and
the output embeddings (lm_head).  We call those same transformers functions, so the list is the real one.

The quantizer's view.  bitsandbytes quantizes every weight in nn.Linear's [out, in] layout, row-major, in blocks of
64 consecutive elements.  A Conv1D stores its weight transposed ([in, out]); transformers transposes it before
quantizing, so its NF4 blocks run along the *input* of the parameter as stored:

    view(W) = W.T (contiguous) for a Conv1D weight, W otherwise          [out, in]
    unview(V) = V.T for a Conv1D weight, V otherwise                     the parameter's own layout

Every NF4 path in mansu (floor geometry, round trip, survival, alignment, twin) forms its blocks on `view` and
maps per-element results back with `unview`; `QuantLayout` holds the transposed names of one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None
    return Conv1D


def quantizable_modules(model: Any) -> dict[str, bool]:
    """{module name: is_conv1d} of the modules bitsandbytes 4-bit loading replaces (Conv1D stores W transposed)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    conv1d = _conv1d_type()
    out: dict[str, bool] = {}
    for name, module in model.named_modules():
        is_conv = conv1d is not None and isinstance(module, conv1d)
        if (type(module) is torch.nn.Linear or is_conv) and should_convert_module(name, skip):
            out[name] = is_conv
    return out


def quantizable_parameter_names(model: Any) -> list[str]:
    """Names (as in `model.named_parameters()`) of the weights NF4 loading quantizes, in model order."""
    return [f"{name}.weight" for name in quantizable_modules(model)]


@dataclass(frozen=True)
class QuantLayout:
    """How the quantizer lays out each weight: the parameter names stored transposed (Conv1D weights).

    The default (no names) is nn.Linear's layout for every tensor; build the real one with `quant_layout(model)`.
    """

    transposed: frozenset[str] = frozenset()

    def is_transposed(self, name: str) -> bool:
        return name in self.transposed

    def view(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The quantizer's view of parameter `name`: [out, in], contiguous, so its flat order is bitsandbytes'."""
        if name not in self.transposed:
            return weight
        if weight.ndim != 2:
            raise ValueError(f"{name}: a transposed (Conv1D) weight must be 2-D, got shape {tuple(weight.shape)}")
        return weight.t().contiguous()

    def unview(self, name: str, view: torch.Tensor) -> torch.Tensor:
        """Inverse of `view`: a tensor in the quantizer's layout back to the parameter's own layout."""
        return view.t().contiguous() if name in self.transposed else view


NATURAL = QuantLayout()  # every weight quantized as stored (nn.Linear models; plain tensors in tests)


def quant_layout(model: Any) -> QuantLayout:
    """The layout of `model`'s quantizable weights: its Conv1D weights are transposed."""
    return QuantLayout(frozenset(f"{name}.weight" for name, conv in quantizable_modules(model).items() if conv))

