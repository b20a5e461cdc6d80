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
from mansu.attribution.edges import valid_matrix
from mansu.models.components import ModelLayout, layer_modules
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
        return cls(layout, up, down, valid_matrix(up, down))

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
    """Writes one pass's node outputs (float32) into `out` [b, U, s, d], in upstream order, so that out[:, :count]
    holds the first `count` nodes as soon as they are computed; `subtract` subtracts them from what `out` holds
    instead (corrupted outputs in, their differences from this run out). `out=None` with `store`: allocated at the
    input; without `store` only the input stream is kept."""

    def __init__(self, model: Any, space: NodeSpace, out: torch.Tensor | None = None, *, subtract: bool = False,
                 store: bool = True):
        self.model, self.space, self.out, self.subtract, self.store = model, space, out, subtract, store
        self.input: torch.Tensor | None = None

    def _write(self, start: int, values: torch.Tensor) -> None:       # values [b, n, s, d]
        if not self.store:
            return
        if self.out is None:
            b, _, s, d = values.shape
            self.out = torch.zeros(b, len(self.space.upstream), s, d, device=values.device)
        target = self.out[:, start:start + values.shape[1]]
        values = values.to(target.device, torch.float32)
        target.sub_(values) if self.subtract else target.copy_(values)

    def on_input(self, e: torch.Tensor) -> None:
        self.input = e.float()
        self._write(0, self.input.unsqueeze(1))

    def on_heads(self, layer: int, z: torch.Tensor) -> None:
        if self.store:
            o_proj = layer_modules(self.model, self.space.layout, layer).o_proj
            self._write(self.space.up_count_before_layer(layer), head_residual_outputs(o_proj, z).transpose(1, 2))

    def on_mlp(self, layer: int, out: torch.Tensor) -> None:
        self._write(self.space.up_count_before_layer(layer) + self.space.layout.n_heads, out.unsqueeze(1))

    def callbacks(self, **edits: Any) -> NodeCallbacks:
        return NodeCallbacks(on_input=self.on_input, on_heads=self.on_heads, on_mlp=self.on_mlp, **edits)


@dataclass
class Pass:
    """One recorded forward pass: the metric, the stream entering layer 0 and (when stored) every node's output."""

    metric: torch.Tensor            # [b]
    input: torch.Tensor             # [b, s, d] float32
    nodes: torch.Tensor | None      # [b, U, s, d] float32


def capture(model: Any, space: NodeSpace, batch: Batch, ids: torch.Tensor, metric: Metric,
            input_override: torch.Tensor | None = None, *, out: torch.Tensor | None = None, subtract: bool = False,
            store: bool = True) -> Pass:
    """One no-grad pass recording node outputs into `out` (allocated when None; `subtract`: out - outputs)."""
    rec = _Recorder(model, space, out, subtract=subtract, store=store)
    with torch.no_grad(), node_hooks(model, space.layout, rec.callbacks(input_override=input_override)):
        logits = model(input_ids=ids, attention_mask=batch.mask).logits
    return Pass(metric_values(logits, batch, metric), rec.input, rec.out)


def corrupted_input(e_clean: torch.Tensor, batch: Batch, corruption: str) -> torch.Tensor:
    """Input stream for mean/zero corruption: the corrupted positions replaced by the batch mean or zeros."""
    real = batch.mask.bool()
    fill = e_clean[real].mean(0) if corruption == "mean" else torch.zeros_like(e_clean[0, 0])
    return torch.where(batch.corrupt_mask[..., None], fill.expand_as(e_clean), e_clean)


def ig_scores(model: Any, space: NodeSpace, batch: Batch, e_clean: torch.Tensor, e_corrupt: torch.Tensor,
              diff: torch.Tensor, metric: Metric, steps: int) -> torch.Tensor:
    """Per-example edge scores [b, U, V]: sum over positions of diff[:, u] . mean over IG steps of d(sum_b metric_b)
    / d(input of v), with `diff` [b, U, s, d] the activation differences a_u(corrupted) - a_u(clean).

    The input stream is interpolated, e_k = e_corrupt + alpha_k (e_clean - e_corrupt) with midpoint
    alpha_k = (k - 1/2) / steps, k = 1..steps; every downstream node reads its own zero-valued probe added to its
    input, and the gradient w.r.t. that probe is the gradient w.r.t. the node's input (through that node only).
    Each probe's gradient is scored and freed as soon as the backward pass produces it, so node-input gradients
    are never all held at once.
    """
    layout = space.layout
    b, s = batch.clean.shape
    scores = torch.zeros(b, len(space.upstream), len(space.downstream), device=diff.device)
    flat = diff.reshape(b, len(space.upstream), -1)                       # [b, U, s*d], a view

    def consume(count: int, cols: slice):
        def hook(probe: torch.Tensor) -> None:
            grad = probe.grad.reshape(-1, b, flat.shape[2]).to(flat.device, torch.float32) / steps   # [n, b, s*d]
            scores[:, :count, cols] += torch.bmm(flat[:, :count], grad.permute(1, 2, 0))
            probe.grad = None
        return hook

    for k in range(1, steps + 1):
        alpha = (k - 0.5) / steps
        e_k = e_corrupt + alpha * (e_clean - e_corrupt)       # float32; the hook casts to the model's dtype
        probes = _probes(space, e_k, consume)
        cb = NodeCallbacks(input_override=e_k, head_edit=lambda l, r: probes[("h", l)],
                           mlp_edit=lambda l, r: probes[("m", l)], logits_edit=lambda r: probes["logits"])
        with torch.enable_grad(), node_hooks(model, layout, cb):
            value = metric_values(model(input_ids=batch.clean, attention_mask=batch.mask).logits, batch, metric).sum()
            torch.autograd.backward(value, inputs=list(probes.values()))
    return scores


def _probes(space: NodeSpace, like: torch.Tensor, consume: Any) -> dict[Any, torch.Tensor]:
    """Zero probes (stride-0 views: no memory until their gradient) with the hook that scores their gradient."""
    layout = space.layout
    h, n_layers = layout.n_heads, layout.n_layers

    def probe(shape: tuple[int, ...], count: int, cols: slice) -> torch.Tensor:
        p = torch.zeros((), dtype=like.dtype, device=like.device).expand(*shape).requires_grad_()
        p.register_post_accumulate_grad_hook(consume(count, cols))
        return p

    probes = {("h", l): probe((h, *like.shape), space.up_count_before_layer(l), space.down_heads(l))
              for l in range(n_layers)}
    probes.update({("m", l): probe(tuple(like.shape), space.up_count_before_layer(l) + h,
                                   slice(space.down_mlp(l), space.down_mlp(l) + 1)) for l in range(n_layers)})
    probes["logits"] = probe(tuple(like.shape), len(space.upstream), slice(space.down_logits, space.down_logits + 1))
    return probes


def run_with_edge_edits(model: Any, space: NodeSpace, batch: Batch, metric: Metric, keep: torch.Tensor,
                        corrupt_acts: torch.Tensor, input_override: torch.Tensor | None = None) -> torch.Tensor:
    """Metric [b] when edge u -> v carries u's output of *this* run where keep[u, v], else u's corrupted output.

    Node v's input becomes  stream_v - sum_{u: not keep[u,v]} (a_u(this run) - a_u(corrupted)).
    keep all-True gives the clean model, all-False the corrupted one (used for faithfulness and exact patching).
    `corrupt_acts` [b, U, s, d] is consumed: this run's outputs are subtracted from it in place as they appear.
    """
    drop = (~keep & space.valid).float().to(corrupt_acts.device)          # [U, V]
    rec = _Recorder(model, space, corrupt_acts, subtract=True)
    n_heads = space.layout.n_heads
    b, n_up, s, d = corrupt_acts.shape
    flat = corrupt_acts.reshape(b, n_up, s * d)                            # corrupted - this run, a view

    def delta(count: int, cols: slice, device: torch.device) -> torch.Tensor | None:
        weights = drop[:count, cols]                                       # [count, n]
        if not bool(weights.any()):
            return None
        out = torch.matmul(weights.T, flat[:, :count]).reshape(b, -1, s, d).transpose(0, 1)   # [n, b, s, d]
        return out.to(device)

    def head_edit(layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        return delta(space.up_count_before_layer(layer), space.down_heads(layer), resid.device)

    def mlp_edit(layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        j = space.down_mlp(layer)
        out = delta(space.up_count_before_layer(layer) + n_heads, slice(j, j + 1), resid.device)
        return None if out is None else out[0]

    def logits_edit(resid: torch.Tensor) -> torch.Tensor | None:
        j = space.down_logits
        out = delta(n_up, slice(j, j + 1), resid.device)
        return None if out is None else out[0]

    cb = rec.callbacks(input_override=input_override, head_edit=head_edit, mlp_edit=mlp_edit, logits_edit=logits_edit)
    with torch.no_grad(), node_hooks(model, space.layout, cb):
        logits = model(input_ids=batch.clean, attention_mask=batch.mask).logits
    return metric_values(logits, batch, metric)
