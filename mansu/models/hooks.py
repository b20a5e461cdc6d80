"""Hook context managers on stock HF models: every hook is removed in `finally`, even when the forward raises.

`node_hooks` turns a stock decoder (Llama-style or GPT-2, fp32/bf16 or bitsandbytes 4-bit Linear layers) into the
node graph of `mansu.models.components` without rewriting it:

* the stream entering layer 0 (node ``input``) can be read and replaced (forward pre-hook on layer 0);
* every downstream node reads its own copy of the residual stream, to which an edit can be added: the MLP and the
  logits through a forward pre-hook on their pre-norm; the heads through *per-head copies*: the pre-attention norm's
  input ``[b, s, d]`` is expanded to ``[H*b, s, d]`` (copy h = stream + edit_h), the attention module runs once on
  the expanded batch (its mask / position tensors repeated), and a forward pre-hook on o_proj keeps head h's slice
  of z from copy h. Each head therefore computes its queries, keys and values (its GQA kv head included) from its
  own input, which is what Hanna et al.'s per-head node inputs mean. Cost: attention runs on H times the batch in a
  layer that is edited; layers without an edit run unchanged.
* head outputs ``z`` (o_proj input, per head) and MLP outputs are reported to callbacks as they are computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mansu.models.components import ModelLayout, decoder_layers, final_norm, layer_modules

_BYPASS = [0]


@contextlib.contextmanager
def bypass() -> Iterator[None]:
    """Inside this block mansu hooks do nothing (used to call a hooked module, e.g. o_proj, from a hook)."""
    _BYPASS[0] += 1
    try:
        yield
    finally:
        _BYPASS[0] -= 1


def _active() -> bool:
    return _BYPASS[0] == 0


@contextlib.contextmanager
def hooks(registrations: list[tuple[Any, str, Callable, bool]]) -> Iterator[list]:
    """Register (module, "pre" | "forward", fn, with_kwargs) hooks; all are removed on exit, also on error."""
    handles: list = []
    try:
        for module, kind, fn, with_kwargs in registrations:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
            elif kind == "forward":
                handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
            else:
                raise ValueError(f"unknown hook kind {kind!r}: accepted are pre, forward")
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: torch.nn.Module) -> int:
    """Forward and pre-forward hooks currently registered anywhere in `model` (0 on a clean model)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@dataclass
class NodeCallbacks:
    """What one forward pass does at the graph's nodes; every field is optional.

    input_override: tensor [b, s, d] replacing the stream entering layer 0.
    on_input(e):               the stream entering layer 0 (after any override).
    head_edit(layer, resid):   [H, b, s, d] added to each head's own copy of the stream, or None (no expansion).
    on_heads(layer, z):        per-head o_proj inputs z [b, s, H, head_dim] of the layer.
    mlp_edit(layer, resid):    [b, s, d] added to the MLP's input, or None.
    on_mlp(layer, out):        MLP output [b, s, d].
    logits_edit(resid):        [b, s, d] added to the final norm's input, or None.
    """

    input_override: torch.Tensor | None = None
    on_input: Callable[[torch.Tensor], None] | None = None
    head_edit: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None
    on_heads: Callable[[int, torch.Tensor], None] | None = None
    mlp_edit: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None
    on_mlp: Callable[[int, torch.Tensor], None] | None = None
    logits_edit: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    _expanded: dict[int, int] = field(default_factory=dict)   # layer -> original batch size while expanded


def _first_tensor(args: tuple, kwargs: dict, name: str) -> tuple[torch.Tensor, bool]:
    return (args[0], True) if args else (kwargs[name], False)


def _replace_first(args: tuple, kwargs: dict, name: str, value: torch.Tensor, positional: bool):
    if positional:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, name: value}


def _repeat_batch(value: Any, batch: int, copies: int) -> Any:
    """Repeat every per-example tensor (ndim >= 2, leading dim == batch) `copies` times along dim 0."""
    if isinstance(value, torch.Tensor):
        if batch > 1 and value.ndim >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(_repeat_batch(v, batch, copies) for v in value)
    return value


def _input_hooks(cb: NodeCallbacks, layer0: Any) -> list:
    def pre(module, args, kwargs):
        if not _active():
            return None
        hidden, positional = _first_tensor(args, kwargs, "hidden_states")
        if cb.input_override is not None:
            hidden = cb.input_override.to(hidden.dtype)
        if cb.on_input is not None:
            cb.on_input(hidden)
        return _replace_first(args, kwargs, "hidden_states", hidden, positional)
    return [(layer0, "pre", pre, True)]


def _head_hooks(cb: NodeCallbacks, layout: ModelLayout, layer: int, mods: Any) -> list:
    n_heads, hd = layout.n_heads, layout.head_dim

    def norm_pre(module, args, kwargs):
        if not _active() or cb.head_edit is None:
            return None
        resid, positional = _first_tensor(args, kwargs, "hidden_states")
        edit = cb.head_edit(layer, resid)
        if edit is None:
            return None
        b = resid.shape[0]
        cb._expanded[layer] = b
        expanded = (resid.unsqueeze(0) + edit.to(resid.dtype)).reshape(n_heads * b, *resid.shape[1:])
        return _replace_first(args, kwargs, "hidden_states", expanded, positional)

    def attn_pre(module, args, kwargs):
        if not _active() or layer not in cb._expanded:
            return None
        b = cb._expanded[layer]
        new_args = (args[0], *(_repeat_batch(a, b, n_heads) for a in args[1:])) if args else args
        new_kwargs = {k: (v if k == "hidden_states" else _repeat_batch(v, b, n_heads)) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def o_pre(module, args):
        if not _active():
            return None
        z = args[0]
        if layer in cb._expanded:
            b = cb._expanded.pop(layer)
            idx = torch.arange(n_heads, device=z.device)
            z5 = z.reshape(n_heads, b, z.shape[1], n_heads, hd)
            z4 = z5[idx, :, :, idx, :].permute(1, 2, 0, 3)          # [b, s, H, hd]: head h from copy h
        else:
            z4 = z.reshape(*z.shape[:-1], n_heads, hd)
        if cb.on_heads is not None:
            cb.on_heads(layer, z4)
        return (z4.reshape(*z4.shape[:2], n_heads * hd),)

    return [(mods.attn_norm, "pre", norm_pre, True), (mods.attn, "pre", attn_pre, True), (mods.o_proj, "pre", o_pre,
                                                                                          False)]


def _mlp_hooks(cb: NodeCallbacks, layer: int, mods: Any) -> list:
    def norm_pre(module, args, kwargs):
        if not _active() or cb.mlp_edit is None:
            return None
        resid, positional = _first_tensor(args, kwargs, "hidden_states")
        edit = cb.mlp_edit(layer, resid)
        return None if edit is None else _replace_first(args, kwargs, "hidden_states", resid + edit.to(resid.dtype),
                                                        positional)

    def post(module, args, output):
        if _active() and cb.on_mlp is not None:
            cb.on_mlp(layer, output)
        return None
    return [(mods.mlp_norm, "pre", norm_pre, True), (mods.mlp, "forward", post, False)]


def _logits_hooks(cb: NodeCallbacks, norm: Any) -> list:
    def pre(module, args, kwargs):
        if not _active() or cb.logits_edit is None:
            return None
        resid, positional = _first_tensor(args, kwargs, "hidden_states")
        edit = cb.logits_edit(resid)
        return None if edit is None else _replace_first(args, kwargs, "hidden_states", resid + edit.to(resid.dtype),
                                                        positional)
    return [(norm, "pre", pre, True)]


@contextlib.contextmanager
def node_hooks(model: Any, layout: ModelLayout, callbacks: NodeCallbacks) -> Iterator[NodeCallbacks]:
    """Attach the node-graph hooks for one or more forward passes; removed on exit (also when the forward raises)."""
    registrations = _input_hooks(callbacks, decoder_layers(model, layout)[0])
    for layer in range(layout.n_layers):
        mods = layer_modules(model, layout, layer)
        registrations += _head_hooks(callbacks, layout, layer, mods) + _mlp_hooks(callbacks, layer, mods)
    registrations += _logits_hooks(callbacks, final_norm(model, layout))
    with hooks(registrations):
        try:
            yield callbacks
        finally:
            callbacks._expanded.clear()


def head_residual_outputs(o_proj: Any, z4: torch.Tensor) -> torch.Tensor:
    """Each head's output in the residual stream, [b, s, H, d]: z_h @ W_o[:, h-block].T (o_proj's bias removed).

    nn.Linear and GPT-2's Conv1D use their weight directly; any other module (bitsandbytes Linear4bit, ...) is
    called on a block-masked copy of z (H times the matmul, but no access to its weight format needed).
    """
    b, s, n_heads, hd = z4.shape
    weight = getattr(o_proj, "weight", None)
    if type(o_proj) is torch.nn.Linear:                                # W [d, H*hd]: one einsum, no H-fold matmul
        return torch.einsum("bshk,dhk->bshd", z4, weight.view(weight.shape[0], n_heads, hd).to(z4.dtype))
    if type(o_proj).__name__ == "Conv1D" and weight is not None:       # GPT-2: W [H*hd, d]
        return torch.einsum("bshk,hkd->bshd", z4, weight.view(n_heads, hd, weight.shape[1]).to(z4.dtype))
    eye = torch.eye(n_heads, dtype=z4.dtype, device=z4.device)
    masked = (z4.unsqueeze(0) * eye[:, None, None, :, None]).reshape(n_heads * b, s, n_heads * hd)
    with bypass():
        out = o_proj(masked)                                       # [H*b, s, d]
        bias = o_proj(torch.zeros(1, 1, n_heads * hd, dtype=z4.dtype, device=z4.device))
    return (out - bias).reshape(n_heads, b, s, -1).permute(1, 2, 0, 3)


@contextlib.contextmanager
def differentiable_4bit(model: torch.nn.Module) -> Iterator[None]:
    """Make bitsandbytes 4-bit layers differentiable w.r.t. their inputs for the duration of the block.

    bitsandbytes 0.50 on CPUs with avx512_bf16 repacks NF4 weights at the first no-grad eval forward and from then
    on computes with a kernel that has no autograd formula: gradients through it are silently zero. Inside this
    block every Linear4bit is switched to its dequantize-then-matmul path (weights unpacked to the standard NF4
    layout, repacking off), so node-input gradients are real; the repacking flag is restored on exit. Values are
    unchanged: only the storage layout of the 4-bit codes is converted.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    flags = [m.support_avx512bf16_for_cpu for m in layers]
    try:
        for module in layers:
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)
                if hasattr(module, "quant_state"):
                    module.quant_state = weight.quant_state
        yield
    finally:
        for module, flag in zip(layers, flags):
            module.support_avx512bf16_for_cpu = flag
