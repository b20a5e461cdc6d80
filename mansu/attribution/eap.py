"""EAP-IG edge attribution (Hanna et al. 2024, "Have Faith in Faithfulness") on stock HF causal LMs.

For an edge u -> v of the component graph (`mansu.models.components`) and one example,

    score(u -> v) = sum_pos  (a_u(corrupted) - a_u(clean))  .  (1/m) sum_{k=1..m} dM/d(in_v) |_{e_k}

* a_u is u's output in the residual stream ([pos, d_model]); in_v is v's input, the residual stream v reads, given
  to each downstream node as its own copy (per head, so a head's gradient flows through that head only).
* M is the metric (`mansu.attribution.data`: logit difference by default, or summed log-probability of the
  answer tokens) of the example.
* e_k = e_corrupted + alpha_k (e_clean - e_corrupted), alpha_k = (k - 1/2)/m: like the reference code only the
  input stream (node ``input``) is interpolated; we use the midpoint rule (the reference uses k/m), which makes
  the completeness check below tighter for the same number of steps.
* Scores are summed over positions and averaged over examples; ``graph.per_example`` keeps them per example.

Sign: a score estimates M(edge corrupted) - M(clean), so edges that carry the answer have negative scores;
circuits rank edges by |score|.

Completeness (tested): with ``input`` interpolated, sum_v score(input -> v) is the integrated gradient of M along
the input path, so it approximates M(corrupted) - M(clean) up to the midpoint-rule error.

Memory, streamed per batch on the model's device (formula in `mansu.attribution.budget`): with b examples of s
positions, U upstream / V downstream nodes, width d and H heads, one batch holds the activation differences
diff [b, U, s, d] float32 (4 b s U d bytes; clean and corrupted passes share this one buffer), the per-example
scores [b, U, V] (4 b U V), the input streams (12 b s d) and one layer's node-input gradients while they are scored
(8 b s H d); every gradient is scored as the backward pass produces it, and the batch's tensors are freed before
the next batch. An 8B Llama (32 layers x 32 heads, d = 4096, U = V = 1057) on 32 records of 64 tokens needs
1.18 GB per example of the batch: 4.7 GB at batch_size 4, 18.9 GB at 16, 37.9 GB with all 32 in one batch (before:
71 GB of clean + corrupted activations kept for the circuit search, plus CPU copies of diff and of the [b, s, V, d]
gradient sum). The model's autograd activations come on top and also scale with b.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mansu.attribution.data import Batch, Corruption, Metric, build_examples, check_modes, collate, metric_values
from mansu.attribution.engine import NodeSpace, Pass, capture, corrupted_input, ig_scores
from mansu.devices import input_device
from mansu.models.components import model_layout, parse_node
from mansu.models.hooks import NodeCallbacks, differentiable_4bit, node_hooks

log = logging.getLogger(__name__)


@dataclass
class AttributionGraph:
    """Dense edge scores with the node names that index them.

    scores[u, v] is the mean over examples of score(upstream[u] -> downstream[v]); 0 where no edge exists
    (``valid`` False). per_example [n, U, V] is kept when requested (CAD needs it for its bootstrap).
    """

    upstream: list[str]
    downstream: list[str]
    scores: torch.Tensor                       # [U, V] float32
    valid: torch.Tensor                        # [U, V] bool
    metric_clean: torch.Tensor                 # [n] float32, M on each clean example
    metric_corrupt: torch.Tensor               # [n] float32, M on each corrupted example
    per_example: torch.Tensor | None = None    # [n, U, V] float32
    metadata: dict[str, Any] = field(default_factory=dict)

    def edges(self) -> list[tuple[str, str, float]]:
        """Every existing edge as (upstream, downstream, score), row-major."""
        us, vs = torch.nonzero(self.valid, as_tuple=True)
        up, down = self.upstream, self.downstream
        return [(up[u], down[v], s) for u, v, s in zip(us.tolist(), vs.tolist(), self.scores[us, vs].tolist())]

    def score(self, upstream: str, downstream: str) -> float:
        return float(self.scores[self.upstream.index(upstream), self.downstream.index(downstream)])

    def edge_index(self, upstream: str, downstream: str) -> tuple[int, int]:
        return self.upstream.index(upstream), self.downstream.index(downstream)


@dataclass
class _Prepared:
    space: NodeSpace
    batches: list[Batch]
    dropped: int
    indices: list[int]


def prepare(model: Any, tokenizer: Any, records: Sequence[Any], *, metric: Metric, corruption: Corruption,
            batch_size: int, max_records: int | None) -> _Prepared:
    """Validate the inputs, build clean/corrupted examples and batches on the model's device."""
    check_modes(metric, corruption)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    space = NodeSpace.of(model_layout(model))
    records = list(records)[:max_records] if max_records else list(records)
    examples, dropped = build_examples(model, tokenizer, records, metric=metric, corruption=corruption)
    device = input_device(model)
    batches = [collate(examples[i:i + batch_size]).to(device) for i in range(0, len(examples), batch_size)]
    return _Prepared(space, batches, dropped, [e.index for e in examples])


@dataclass
class Differences:
    """One batch's clean and corrupted passes, reduced to what EAP-IG and exact patching need."""

    m_clean: torch.Tensor       # [b]
    m_corrupt: torch.Tensor     # [b]
    e_clean: torch.Tensor       # [b, s, d] the clean input stream
    e_corrupt: torch.Tensor     # [b, s, d] the corrupted input stream
    diff: torch.Tensor          # [b, U, s, d] a_u(corrupted) - a_u(clean), float32


def corrupted_pass(model: Any, space: NodeSpace, batch: Batch, metric: Metric, corruption: Corruption,
                   e_clean: torch.Tensor, **record: Any) -> tuple[Pass, torch.Tensor]:
    """The corrupted pass of one batch (recording as `capture` does) and its input stream [b, s, d]."""
    if corruption == "counterfactual":
        run = capture(model, space, batch, batch.corrupt, metric, **record)
        return run, run.input
    e_corrupt = corrupted_input(e_clean, batch, corruption)
    return capture(model, space, batch, batch.clean, metric, input_override=e_corrupt, **record), e_corrupt


def differences(model: Any, space: NodeSpace, batch: Batch, metric: Metric, corruption: Corruption) -> Differences:
    """Clean then corrupted pass into one [b, U, s, d] buffer: the corrupted pass subtracts its node outputs from
    the clean ones as they appear, so only one activation tensor of the batch is ever held."""
    clean = capture(model, space, batch, batch.clean, metric)
    corrupt, e_corrupt = corrupted_pass(model, space, batch, metric, corruption, clean.input, out=clean.nodes,
                                        subtract=True)
    return Differences(clean.metric, corrupt.metric, clean.input, e_corrupt, corrupt.nodes.neg_())


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


def attribute(model: Any, tokenizer: Any, records: Sequence[Any], *, ig_steps: int = 8,
              corruption: Corruption = "counterfactual", metric: Metric = "logit_diff", batch_size: int = 16,
              max_records: int | None = 64, per_example: bool = False, progress: bool = False) -> AttributionGraph:
    """EAP-IG scores of every edge of the model's component graph on MCQ `records` (cloze prompts).

    Memory per batch: see the module docstring (4 b s U d bytes of activation differences dominate).
    `max_records` keeps the first records only (None: all).
    """
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    with differentiable_4bit(model):
        return _attribute(model, tokenizer, records, ig_steps=ig_steps, corruption=corruption, metric=metric,
                          batch_size=batch_size, max_records=max_records, per_example=per_example, progress=progress)


def _attribute(model: Any, tokenizer: Any, records: Sequence[Any], *, ig_steps: int, corruption: Corruption,
               metric: Metric, batch_size: int, max_records: int | None, per_example: bool,
               progress: bool) -> AttributionGraph:
    prep = prepare(model, tokenizer, records, metric=metric, corruption=corruption, batch_size=batch_size,
                   max_records=max_records)
    space = prep.space
    sums = torch.zeros(len(space.upstream), len(space.downstream))
    kept, m_clean, m_corrupt = [], [], []
    for batch in _progress(prep.batches, progress, "EAP-IG"):
        base = differences(model, space, batch, metric, corruption)
        diff = base.diff.mul_(batch.mask[:, None, :, None].to(base.diff.device))    # padded positions carry nothing
        scores = ig_scores(model, space, batch, base.e_clean, base.e_corrupt, diff, metric, ig_steps).cpu()
        m_clean.append(base.m_clean.cpu())
        m_corrupt.append(base.m_corrupt.cpu())
        del base, diff                      # this batch's activations go before the next batch's are made
        sums += scores.sum(0)
        if per_example:
            kept.append(scores)
    n = sum(len(b.indices) for b in prep.batches)
    meta = _metadata(model, space, metric, corruption, ig_steps, n, prep)
    return AttributionGraph(space.upstream, space.downstream, sums / n, space.valid.clone(), torch.cat(m_clean),
                            torch.cat(m_corrupt), torch.cat(kept) if per_example else None, meta)


def _metadata(model: Any, space: NodeSpace, metric: str, corruption: str, ig_steps: int, n: int,
              prep: _Prepared) -> dict[str, Any]:
    layout = space.layout
    return {"model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
            "model_type": layout.model_type, "n_layers": layout.n_layers, "n_heads": layout.n_heads,
            "n_kv_heads": layout.n_kv_heads, "d_model": layout.d_model, "metric": metric, "corruption": corruption,
            "ig_steps": ig_steps, "n_examples": n, "n_dropped": prep.dropped, "record_indices": prep.indices,
            "quadrature": "midpoint", "method": "EAP-IG (input interpolation)"}


def exact_edge_effects(model: Any, tokenizer: Any, records: Sequence[Any], *, corruption: Corruption = "counterfactual",
                       metric: Metric = "logit_diff", batch_size: int = 16, max_records: int | None = 64,
                       edges: Sequence[tuple[str, str]] | None = None, progress: bool = False) -> torch.Tensor:
    """Exact activation patching of single edges: mean over examples of M(edge u->v corrupted) - M(clean), [U, V].

    Patching edge u -> v replaces u's contribution to v's input only: in_v += a_u(corrupted) - a_u(clean); every
    other node reads the clean stream, and v's changed output flows on through the rest of the model.
    One forward pass per edge (the reference EAP-IG approximates); `edges` restricts to a subset (others are 0).
    """
    with differentiable_4bit(model):     # same (fp32 dequantize) path as attribute, for a like-for-like comparison
        prep = prepare(model, tokenizer, records, metric=metric, corruption=corruption, batch_size=batch_size,
                       max_records=max_records)
        return _exact(model, prep, metric, corruption, edges, progress)


def _exact(model: Any, prep: _Prepared, metric: Metric, corruption: Corruption,
           edges: Sequence[tuple[str, str]] | None, progress: bool) -> torch.Tensor:
    space = prep.space
    pairs = _edge_indices(space, edges)
    effects = torch.zeros(len(space.upstream), len(space.downstream))
    for batch in prep.batches:
        base = differences(model, space, batch, metric, corruption)
        for u, v in _progress(pairs, progress, "patching"):
            patched = _patch_one_edge(model, space, batch, metric, u, v, base.diff[:, u])
            effects[u, v] += float((patched - base.m_clean).sum())
    return effects / sum(len(b.indices) for b in prep.batches)


def _patch_one_edge(model: Any, space: NodeSpace, batch: Batch, metric: Metric, u: int, v: int,
                    delta: torch.Tensor) -> torch.Tensor:
    """Metric [b] with in_v += delta (= a_u(corrupted) - a_u(clean)); equivalent to `run_with_edge_edits` with only
    edge (u, v) dropped, since every other input is clean, but without recording every node's output."""
    kind, layer, head = parse_node(space.downstream[v])
    delta = delta.to(batch.clean.device)

    def head_edit(l: int, resid: torch.Tensor) -> torch.Tensor | None:
        if kind != "head" or l != layer:
            return None
        edit = torch.zeros(space.layout.n_heads, *resid.shape, dtype=delta.dtype, device=delta.device)
        edit[head] = delta
        return edit

    cb = NodeCallbacks(head_edit=head_edit,
                       mlp_edit=lambda l, r: delta if kind == "mlp" and l == layer else None,
                       logits_edit=lambda r: delta if kind == "logits" else None)
    with torch.no_grad(), node_hooks(model, space.layout, cb):
        logits = model(input_ids=batch.clean, attention_mask=batch.mask).logits
    return metric_values(logits, batch, metric)


def _edge_indices(space: NodeSpace, edges: Sequence[tuple[str, str]] | None) -> list[tuple[int, int]]:
    if edges is None:
        us, vs = torch.nonzero(space.valid, as_tuple=True)
        return list(zip(us.tolist(), vs.tolist()))
    out = []
    for u, v in edges:
        if u not in space.upstream or v not in space.downstream:
            raise ValueError(f"unknown edge {u} -> {v}: nodes are {space.upstream[0]}..{space.downstream[-1]}")
        out.append((space.upstream.index(u), space.downstream.index(v)))
    return out
