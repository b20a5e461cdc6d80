"""Which weights NF4 quantizes: transformers' default for bitsandbytes 4-bit loading.

transformers (`replace_with_bnb_linear`) converts every module whose type is exactly `nn.Linear` (or GPT-2's
`Conv1D`) unless its name matches `get_keys_to_not_convert(model)`: tied weights, the last parameter's module and
the output embeddings (lm_head).  We call those same transformers functions, so the list is the real one.
"""

from __future__ import annotations

from typing import Any


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None
    return Conv1D


def quantizable_modules(model: Any) -> dict[str, bool]:
    """{module name: is_conv1d} of the modules bitsandbytes 4-bit loading replaces (Conv1D stores W transposed)."""
    import torch
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
