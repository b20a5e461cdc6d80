"""Forward and backward passes over the node graph: capture node outputs, per-node input gradients, edge edits.

Node outputs live in the residual stream (d_model vectors per position): ``input`` is the stream entering layer 0,
a head's output is ``z_h @ W_o[:, h].T`` (`mansu.models.hooks.head_residual_outputs`), an MLP's output is what
it adds to the stream. A downstream node's input is the sum of its upstream nodes' outputs (plus constant biases),
i.e. the residual stream at that point; the hooks give every downstream node its own copy of that stream, so the
gradient w.r.t. a node's input is the gradient through that node only (per head, GQA kv heads included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mansu.attribution.data import Batch, Metric, metric_values
from mansu.models.components import ModelLayout, edge_exists, layer_modules
from mansu.models.hooks import NodeCallbacks, head_residual_outputs, node_hooks


@dataclass(frozen=True)
class NodeSpace:
    """Node names and index arithmetic of one model's graph."""

    layout: ModelLayout
    upstream: list[str]
    downstream: list[str]
    valid: torch.Tensor    # [U, V] bool: edge u -> v exists

    @classmethod
    def of(cls, layout: ModelLayout) -> NodeSpace:
        up, down = layout.upstream_nodes(), layout.downstream_nodes()
        valid = torch.tensor([[edge_exists(u, v) for v in down] for u in up], dtype=torch.bool)
        return cls(layout, up, down, valid)

    def up_count_before_layer(self, layer: int) -> int:
        """Upstream nodes feeding the heads of `layer`: input and every node of earlier layers."""
        return 1 + layer * (self.layout.n_heads + 1)

    def down_heads(self, layer: int) -> slice:
        h = self.layout.n_heads
        return slice(layer * (h + 1), layer * (h + 1) + h)

    def down_mlp(self, layer: int) -> int:
        return layer * (self.layout.n_heads + 1) + self.layout.n_heads

    @property
    def down_logits(self) -> int:
        return len(self.downstream) - 1


class _Recorder:
    """Collects node outputs of one pass into per-layer slots (float32)."""

    def __init__(self, model: Any, space: NodeSpace):
        self.model, self.space = model, space
        self.input: torch.Tensor | None = None
        self.heads: dict[int, torch.Tensor] = {}
        self.mlps: dict[int, torch.Tensor] = {}

    def on_input(self, e: torch.Tensor) -> None:
        self.input = e.float()

    def on_heads(self, layer: int, z: torch.Tensor) -> None:
        o_proj = layer_modules(self.model, self.space.layout, layer).o_proj
        self.heads[layer] = head_residual_outputs(o_proj, z).float()      # [b, s, H, d]

    def on_mlp(self, layer: int, out: torch.Tensor) -> None:
        self.mlps[layer] = out.float()

    def upto(self, count: int) -> torch.Tensor:
        """The first `count` upstream nodes' outputs so far, [b, s, count, d]."""
        parts = [self.input.unsqueeze(2)]
        for layer in range(self.space.layout.n_layers):
            if layer in self.heads:
                parts += [self.heads[layer],
                          self.mlps[layer].unsqueeze(2)] if layer in self.mlps else [self.heads[layer]]
        return torch.cat(parts, dim=2)[:, :, :count]

    def stacked(self) -> torch.Tensor:
        return self.upto(len(self.space.upstream))


def capture(model: Any, space: NodeSpace, batch: Batch, ids: torch.Tensor, metric: Metric,
            input_override: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad pass: (metric [b], node outputs [b, s, U, d] float32)."""
    rec = _Recorder(model, space)
    cb = NodeCallbacks(input_override=input_override, on_input=rec.on_input, on_heads=rec.on_heads, on_mlp=rec.on_mlp)
    with torch.no_grad(), node_hooks(model, space.layout, cb):
        logits = model(input_ids=ids, attention_mask=batch.mask).logits
    return metric_values(logits, batch, metric), rec.stacked()


def corrupted_input(e_clean: torch.Tensor, batch: Batch, corruption: str) -> torch.Tensor:
    """Input stream for mean/zero corruption: the corrupted positions replaced by the batch mean or zeros."""
    real = batch.mask.bool()
    fill = e_clean[real].mean(0) if corruption == "mean" else torch.zeros_like(e_clean[0, 0])
    return torch.where(batch.corrupt_mask[..., None], fill.expand_as(e_clean), e_clean)


def ig_gradients(model: Any, space: NodeSpace, batch: Batch, e_clean: torch.Tensor, e_corrupt: torch.Tensor,
                 metric: Metric, steps: int) -> torch.Tensor:
    """Mean over IG steps of d(sum_b metric_b) / d(input of each downstream node), [b, s, V, d] float32.

    The input stream is interpolated, e_k = e_corrupt + alpha_k (e_clean - e_corrupt) with midpoint
    alpha_k = (k - 1/2) / steps, k = 1..steps; every downstream node reads its own zero-valued probe added to its
    input, and the gradient w.r.t. that probe is the gradient w.r.t. the node's input (through that node only).
    """
    layout = space.layout
    b, s = batch.clean.shape
    d, h = layout.d_model, layout.n_heads
    total = torch.zeros(b, s, len(space.downstream), d)
    for k in range(1, steps + 1):
        alpha = (k - 0.5) / steps
        e_k = e_corrupt + alpha * (e_clean - e_corrupt)       # float32; the hook casts to the model's dtype
        probes = {("h", l): torch.zeros(h, b, s, d, dtype=e_k.dtype, device=e_k.device, requires_grad=True)
                  for l in range(layout.n_layers)}
        probes.update({("m", l): torch.zeros(b, s, d, dtype=e_k.dtype, device=e_k.device, requires_grad=True)
                       for l in range(layout.n_layers)})
        probes["logits"] = torch.zeros(b, s, d, dtype=e_k.dtype, device=e_k.device, requires_grad=True)
        cb = NodeCallbacks(input_override=e_k, head_edit=lambda l, r: probes[("h", l)],
                           mlp_edit=lambda l, r: probes[("m", l)], logits_edit=lambda r: probes["logits"])
        with torch.enable_grad(), node_hooks(model, layout, cb):
            value = metric_values(model(input_ids=batch.clean, attention_mask=batch.mask).logits, batch, metric).sum()
            keys = list(probes)
            grads = torch.autograd.grad(value, [probes[key] for key in keys], allow_unused=True)
        for key, grad in zip(keys, grads):
            grad = torch.zeros_like(probes[key]) if grad is None else grad
            _accumulate(total, space, key, grad.detach().float().cpu() / steps)
    return total


def _accumulate(total: torch.Tensor, space: NodeSpace, key: Any, grad: torch.Tensor) -> None:
    if key == "logits":
        total[:, :, space.down_logits] += grad
    elif key[0] == "h":
        total[:, :, space.down_heads(key[1])] += grad.permute(1, 2, 0, 3)
    else:
        total[:, :, space.down_mlp(key[1])] += grad


def run_with_edge_edits(model: Any, space: NodeSpace, batch: Batch, metric: Metric, keep: torch.Tensor,
                        corrupt_acts: torch.Tensor, input_override: torch.Tensor | None = None) -> torch.Tensor:
    """Metric [b] when edge u -> v carries u's output of *this* run where keep[u, v], else u's corrupted output.

    Node v's input becomes  stream_v - sum_{u: not keep[u,v]} (a_u(this run) - a_u(corrupted)).
    keep all-True gives the clean model, all-False the corrupted one (used for faithfulness and exact patching).
    """
    rec = _Recorder(model, space)
    drop = (~keep & space.valid).float().to(corrupt_acts.device)          # [U, V]
    n_heads = space.layout.n_heads

    def delta(count: int, cols: Any) -> torch.Tensor | None:
        weights = drop[:count, cols]
        if not bool(weights.any()):
            return None
        diff = corrupt_acts[:, :, :count] - rec.upto(count)               # [b, s, count, d]
        return torch.einsum("bsud,u...->...bsd", diff, weights)

    def head_edit(layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        out = delta(space.up_count_before_layer(layer), space.down_heads(layer))
        return None if out is None else out.to(resid.device)

    def mlp_edit(layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        out = delta(space.up_count_before_layer(layer) + n_heads, space.down_mlp(layer))
        return None if out is None else out.to(resid.device)

    def logits_edit(resid: torch.Tensor) -> torch.Tensor | None:
        out = delta(len(space.upstream), space.down_logits)
        return None if out is None else out.to(resid.device)

    cb = NodeCallbacks(input_override=input_override, on_input=rec.on_input, on_heads=rec.on_heads,
                       on_mlp=rec.on_mlp, head_edit=head_edit, mlp_edit=mlp_edit, logits_edit=logits_edit)
    with torch.no_grad(), node_hooks(model, space.layout, cb):
        logits = model(input_ids=batch.clean, attention_mask=batch.mask).logits
    return metric_values(logits, batch, metric)
