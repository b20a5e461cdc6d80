"""LoRA adapters on a model's quantizable Linear (and GPT-2 Conv1D) layers, as QLoRA trains them (Hu et al. 2021;
Dettmers et al. 2023), without peft:

    y = W x + b + (alpha / r) B A x,   A [r, in] ~ Kaiming-uniform, B [out, r] = 0 (so the adapter starts at 0)

Attached by forward hooks inside a `with` block (removed in `finally`), so it composes with mansu.quant.twin's
simulated quantized twin: inside `quantized(model, "nf4")` the frozen W is its NF4 round trip, and only A and B
train.  Bytes per adapted weight: r (in + out) fp32 values, 4 B each (plus Adam's 8 B each while training).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from mansu.quant.targets import quantizable_modules


def _adapter(in_features: int, out_features: int, rank: int, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # peft's default for A
    return a, torch.zeros(out_features, rank)


@contextlib.contextmanager
def lora(model: Any, *, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> Iterator[list[torch.nn.Parameter]]:
    """`with lora(model) as params:` every quantizable module's output gets the adapter term above; the model's own
    parameters are frozen in the block (requires_grad restored on exit) and `params` are the adapters to train."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    params: list[torch.nn.Parameter] = []
    handles = []

    def hook_for(a: torch.nn.Parameter, b: torch.nn.Parameter):
        def hook(module, args, output):
            x = args[0].to(a.dtype)
            return output + (scale * (x @ a.t()) @ b.t()).to(output.dtype)
        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, is_conv in quantizable_modules(model).items():
            weight = model.get_submodule(name).weight
            in_f, out_f = (weight.shape[0], weight.shape[1]) if is_conv else (weight.shape[1], weight.shape[0])
            a, b = (torch.nn.Parameter(t.to(weight.device)) for t in _adapter(in_f, out_f, rank, gen))
            params += [a, b]
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(a, b)))
        yield params
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
