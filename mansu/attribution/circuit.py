"""Circuit selection from an EAP-IG graph, faithfulness by intervention, and the parameters a circuit owns.

Selection (as in Hanna et al.'s reference code), always by |score| over existing edges:

* ``top_n``:     the n edges with the largest |score|;
* ``threshold``: every edge with |score| >= tau;
* ``greedy``:    grow from ``logits``: repeatedly add the highest-|score| edge whose child is already in the
                 circuit (its parent joins the circuit), until n edges.

Then ``prune``: repeatedly drop edges out of nodes with no incoming circuit edge (other than ``input``) and edges
into nodes with no outgoing circuit edge (other than ``logits``), until nothing changes.

Faithfulness: run the model with only the circuit's edges clean; every other edge u -> v carries u's output from
the corrupted run (node v's input = its stream in this run - sum over non-circuit u of (a_u(run) - a_u(corrupted))).
With per-example metrics averaged over the examples,

    faithfulness = (M_circuit - M_corrupted) / (M_clean - M_corrupted)

so the empty circuit scores 0 and the full graph 1 (both tested exactly). ``smallest_faithful_circuit`` searches
the number of edges n (doubling, then bisection), assuming faithfulness grows with n; it returns the smallest n
found whose pruned circuit reaches the target.

Parameters owned (`circuit_parameter_masks`): a head a{L}.h{H} owns its rows of q_proj, the rows of k_proj and
v_proj of its kv head (H // group size under GQA: shared with the other query heads of the group), the bias
entries of those rows, and its columns of o_proj (GPT-2: its q/k/v columns of c_attn and rows of c_proj);
m{L} owns every parameter of the MLP module, or, when the circuit lists its kept neurons (``Circuit.neurons``, chosen
by `mansu.attribution.neurons`), only those neurons' rows/columns (`mansu.models.components.mlp_neuron_axes`);
``input`` and ``logits`` own nothing (embeddings, norms, lm_head and
Qwen3's per-head q_norm/k_norm weights, shared by all heads, are never in a circuit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mansu.attribution.budget import CACHE_MB
from mansu.attribution.data import Corruption, Metric
from mansu.attribution.eap import AttributionGraph, corrupted_pass, prepare
from mansu.attribution.edges import abs_scores, edge_index, greedy_order, prune_mask, top_order
from mansu.attribution.engine import capture, run_with_edge_edits
from mansu.models.components import (
    head_parameter_slices,
    mlp_neuron_axes,
    model_layout,
    node_parameters,
    parse_node,
)
from mansu.models.hooks import differentiable_4bit

Selection = Literal["top_n", "threshold", "greedy"]
SELECTIONS = ("top_n", "threshold", "greedy")


@dataclass
class Circuit:
    """A set of edges (upstream name, downstream name) of an attribution graph."""

    edges: list[tuple[str, str]]
    method: str = ""
    faithfulness: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    neurons: dict[str, list[int]] = field(default_factory=dict)   # MLP node -> kept hidden neurons (absent: all)

    @property
    def nodes(self) -> list[str]:
        return sorted({n for e in self.edges for n in e}, key=_node_sort_key)

    def keep_matrix(self, graph: AttributionGraph) -> torch.Tensor:
        """[U, V] bool, True on the circuit's edges."""
        us, vs = named_edge_indices(self.edges, graph)
        keep = torch.zeros_like(graph.valid)
        keep[us, vs] = True
        return keep

    def to_dict(self) -> dict[str, Any]:
        return {"edges": [list(e) for e in self.edges], "nodes": self.nodes, "method": self.method,
                "faithfulness": self.faithfulness, "n_edges": len(self.edges), "metadata": self.metadata,
                "neurons": self.neurons}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        return cls([tuple(e) for e in data["edges"]], data.get("method", ""), data.get("faithfulness"),
                   data.get("metadata", {}), {k: list(v) for k, v in (data.get("neurons") or {}).items()})


def named_edge_indices(edges: Sequence[tuple[str, str]], graph: AttributionGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """(upstream index, downstream index) int64 [E] of named edges; ValueError naming the first unknown one."""
    up = {name: i for i, name in enumerate(graph.upstream)}
    down = {name: j for j, name in enumerate(graph.downstream)}
    try:
        us = [up[u] for u, _ in edges]
        vs = [down[v] for _, v in edges]
    except KeyError as exc:
        raise ValueError(f"edge node {exc.args[0]!r} is not in the graph: nodes are {graph.upstream[0]}.."
                         f"{graph.downstream[-1]}") from None
    return torch.tensor(us, dtype=torch.long), torch.tensor(vs, dtype=torch.long)


def _node_sort_key(name: str) -> tuple[float, int]:
    kind, layer, head = parse_node(name)
    order = {"input": -1.0, "logits": float("inf")}.get(kind, 2 * layer + (1 if kind == "mlp" else 0))
    return order, head


def _pruned(us: torch.Tensor, vs: torch.Tensor, graph: AttributionGraph) -> torch.Tensor:
    """[E] kept by `prune`, for edges given by graph indices (node ids: upstream index, downstream by name)."""
    ids = {name: i for i, name in enumerate(graph.upstream)}
    down = torch.tensor([ids.setdefault(name, len(ids)) for name in graph.downstream], dtype=torch.long)
    return prune_mask(us, down[vs], len(ids), ids["input"] if "input" in ids else -1,
                      ids["logits"] if "logits" in ids else -1)


def prune(edges: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop edges out of nodes without inputs and into nodes without outputs, until stable."""
    current = list(dict.fromkeys(edges))
    ids: dict[str, int] = {}
    us = torch.tensor([ids.setdefault(u, len(ids)) for u, _ in current], dtype=torch.long)
    vs = torch.tensor([ids.setdefault(v, len(ids)) for _, v in current], dtype=torch.long)
    kept = prune_mask(us, vs, len(ids), ids.get("input", -1), ids.get("logits", -1))
    return [current[i] for i in torch.nonzero(kept).flatten().tolist()]


def edge_ranking(graph: AttributionGraph, method: Literal["top_n", "greedy"]) -> torch.Tensor:
    """Edge numbers (row-major over graph.valid) in the order `method` selects them: its first n are its n edges."""
    if method == "top_n":
        return top_order(graph.scores, graph.valid)
    return greedy_order(graph.scores, graph.valid, graph.upstream, graph.downstream)


def greedy_edges(graph: AttributionGraph, n: int) -> list[tuple[str, str]]:
    """Grow from logits: add the highest-|score| edge whose child is in the circuit, n times."""
    us, vs = edge_index(graph.valid)
    chosen = edge_ranking(graph, "greedy")[:n]
    return _names(graph, us[chosen], vs[chosen])


def _names(graph: AttributionGraph, us: torch.Tensor, vs: torch.Tensor) -> list[tuple[str, str]]:
    up, down = graph.upstream, graph.downstream
    return [(up[u], down[v]) for u, v in zip(us.tolist(), vs.tolist())]


def select_circuit(graph: AttributionGraph, *, method: Selection = "greedy", n_edges: int | None = None,
                   threshold: float | None = None, do_prune: bool = True,
                   ranking: torch.Tensor | None = None) -> Circuit:
    """Select edges by `method` (top_n / greedy need n_edges, threshold needs threshold), then prune.

    `ranking`: `edge_ranking(graph, method)` computed once by a caller that selects many n from one graph."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}: accepted are {', '.join(SELECTIONS)}")
    us, vs = edge_index(graph.valid)
    if method == "threshold":
        if threshold is None or threshold < 0:
            raise ValueError("method='threshold' needs threshold >= 0")
        chosen = torch.nonzero(abs_scores(graph.scores, us, vs) >= threshold).flatten()
    else:
        if n_edges is None or n_edges < 0:
            raise ValueError(f"method={method!r} needs n_edges >= 0")
        chosen = (edge_ranking(graph, method) if ranking is None else ranking)[:n_edges]
    us, vs = us[chosen], vs[chosen]
    if do_prune:
        kept = _pruned(us, vs, graph)
        us, vs = us[kept], vs[kept]
    return Circuit(_names(graph, us, vs), method, None, {"n_edges_requested": n_edges, "threshold": threshold,
                                                         "pruned": do_prune})


@dataclass
class FaithfulnessResult:
    faithfulness: float
    metric_circuit: float
    metric_clean: float
    metric_corrupt: float


class FaithfulnessEvaluator:
    """Runs the model with only a circuit's edges clean; prepares batches and metrics once.

    Each batch's corrupted node outputs [b, U, s, d] float32 (4 b s U d bytes) stay cached on the model's device
    while the cache holds at most `cache_mb` MiB (first batches first); the others are recomputed, one corrupted
    forward pass per batch and evaluation, so memory stays one batch's activations however many records there are.
    """

    def __init__(self, model: Any, tokenizer: Any, records: Sequence[Any], *, metric: Metric = "logit_diff",
                 corruption: Corruption = "counterfactual", batch_size: int = 16, max_records: int | None = 64,
                 cache_mb: int = CACHE_MB):
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0 (MiB of cached activations; 0 recomputes them), got {cache_mb}")
        self.model, self.metric = model, metric
        self.prep = prepare(model, tokenizer, records, metric=metric, corruption=corruption, batch_size=batch_size,
                            max_records=max_records)
        self.cached: list[torch.Tensor | None] = []
        self.overrides: list[torch.Tensor | None] = []      # corrupted input streams of mean/zero corruption
        room, m_clean, m_corrupt = cache_mb * 2**20, [], []
        with differentiable_4bit(model):     # the fp32 dequantize path attribute() uses, on 4-bit models
            for batch in self.prep.batches:
                clean = capture(model, self.prep.space, batch, batch.clean, metric, store=False)
                corrupt, e_corrupt = corrupted_pass(model, self.prep.space, batch, metric, corruption, clean.input)
                size = corrupt.nodes.numel() * corrupt.nodes.element_size()
                self.cached.append(corrupt.nodes if size <= room else None)
                room -= size if size <= room else 0
                self.overrides.append(None if corruption == "counterfactual" else e_corrupt)
                m_clean.append(clean.metric)
                m_corrupt.append(corrupt.metric)
        self.n = sum(len(b.indices) for b in self.prep.batches)
        self.m_clean = float(sum(m.sum() for m in m_clean)) / self.n
        self.m_corrupt = float(sum(m.sum() for m in m_corrupt)) / self.n

    def metric_with(self, keep: torch.Tensor) -> float:
        with differentiable_4bit(self.model):
            total = self._sum_metric(keep)
        return total / self.n

    def _corrupted_nodes(self, i: int) -> torch.Tensor:
        """Batch i's corrupted node outputs [b, U, s, d], a copy the edited run may overwrite."""
        if self.cached[i] is not None:
            return self.cached[i].clone()
        batch, override = self.prep.batches[i], self.overrides[i]
        ids = batch.corrupt if override is None else batch.clean
        return capture(self.model, self.prep.space, batch, ids, self.metric, input_override=override).nodes

    def _sum_metric(self, keep: torch.Tensor) -> float:
        total = 0.0
        for i, batch in enumerate(self.prep.batches):
            # the clean input stream is this run's input; non-circuit edges out of `input` carry the corrupted one
            total += float(run_with_edge_edits(self.model, self.prep.space, batch, self.metric, keep,
                                               self._corrupted_nodes(i)).sum())
        return total

    def evaluate(self, circuit: Circuit, graph: AttributionGraph) -> FaithfulnessResult:
        m = self.metric_with(circuit.keep_matrix(graph))
        denom = self.m_clean - self.m_corrupt
        faith = (m - self.m_corrupt) / denom if abs(denom) > 1e-12 else float("nan")
        return FaithfulnessResult(faith, m, self.m_clean, self.m_corrupt)


def faithfulness(model: Any, tokenizer: Any, records: Sequence[Any], circuit: Circuit, graph: AttributionGraph,
                 **kwargs: Any) -> FaithfulnessResult:
    """(M_circuit - M_corrupted) / (M_clean - M_corrupted) on `records` (metric/corruption from graph metadata)."""
    opts = {"metric": graph.metadata.get("metric", "logit_diff"),
            "corruption": graph.metadata.get("corruption", "counterfactual"), **kwargs}
    return FaithfulnessEvaluator(model, tokenizer, records, **opts).evaluate(circuit, graph)


def smallest_faithful_circuit(model: Any, tokenizer: Any, records: Sequence[Any], graph: AttributionGraph, *,
                              target: float = 0.8, method: Literal["top_n", "greedy"] = "greedy",
                              evaluator: FaithfulnessEvaluator | None = None, **kwargs: Any) -> Circuit:
    """The smallest pruned circuit (by requested edge count) whose faithfulness reaches `target`."""
    if not 0 < target <= 1.5:
        raise ValueError(f"target faithfulness must be in (0, 1.5], got {target}")
    if evaluator is None:
        opts = {"metric": graph.metadata.get("metric", "logit_diff"),
                "corruption": graph.metadata.get("corruption", "counterfactual"), **kwargs}
        evaluator = FaithfulnessEvaluator(model, tokenizer, records, **opts)
    total = int(graph.valid.sum())
    curve: dict[int, float] = {}
    ranking = edge_ranking(graph, method)          # one ranking for every n the search tries

    def faith(n: int) -> tuple[Circuit, float]:
        circuit = select_circuit(graph, method=method, n_edges=n, ranking=ranking)
        curve[n] = evaluator.evaluate(circuit, graph).faithfulness
        return circuit, curve[n]

    lo, hi = 0, 1
    best, value = faith(hi)
    while value < target and hi < total:
        lo, hi = hi, min(2 * hi, total)
        best, value = faith(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        circuit, f = faith(mid)
        if f >= target:
            hi, best, value = mid, circuit, f
        else:
            lo = mid
    best.faithfulness = value
    best.metadata.update({"target": target, "reached": value >= target,
                          "faithfulness_curve": dict(sorted(curve.items())),
                          "metric_clean": evaluator.m_clean, "metric_corrupt": evaluator.m_corrupt})
    return best


def _logical_shape(param: torch.Tensor) -> torch.Size:
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape if quant_state is not None else param.shape


def circuit_parameter_masks(model: Any, circuit: Circuit) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of the parameter entries the circuit's nodes own (parameters owning none are absent).

    Masks have the parameter's logical (unquantized) shape; for bitsandbytes 4-bit weights that is the
    quant_state's shape, not the packed storage.
    """
    layout = model_layout(model)
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for node in circuit.nodes:
        kind, layer, head = parse_node(node)
        if kind == "head":
            for key, (dim, sl) in head_parameter_slices(layout, layer, head).items():
                name = key.split("#")[0]
                if name not in params:
                    continue
                mask = masks.setdefault(name, torch.zeros(_logical_shape(params[name]), dtype=torch.bool))
                mask.narrow(dim, sl.start, sl.stop - sl.start).fill_(True)
        elif kind == "mlp" and node in circuit.neurons:
            kept = torch.tensor(circuit.neurons[node], dtype=torch.long)
            for name, dim in mlp_neuron_axes(layout, layer).items():
                if name in params:
                    mask = masks.setdefault(name, torch.zeros(_logical_shape(params[name]), dtype=torch.bool))
                    mask.index_fill_(dim, kept, True)
        elif kind == "mlp":
            for name in node_parameters(model, layout, node):
                masks[name] = torch.ones(_logical_shape(params[name]), dtype=torch.bool)
    return masks
