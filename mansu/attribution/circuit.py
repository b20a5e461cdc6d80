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
m{L} owns every parameter of the MLP module; ``input`` and ``logits`` own nothing (embeddings, norms, lm_head and
Qwen3's per-head q_norm/k_norm weights, shared by all heads, are never in a circuit).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mansu.attribution.data import Corruption, Metric
from mansu.attribution.eap import AttributionGraph, baseline, prepare
from mansu.attribution.engine import run_with_edge_edits
from mansu.models.components import head_parameter_slices, model_layout, node_parameters, parse_node
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

    @property
    def nodes(self) -> list[str]:
        return sorted({n for e in self.edges for n in e}, key=_node_sort_key)

    def keep_matrix(self, graph: AttributionGraph) -> torch.Tensor:
        """[U, V] bool, True on the circuit's edges."""
        keep = torch.zeros_like(graph.valid)
        for u, v in self.edges:
            keep[graph.edge_index(u, v)] = True
        return keep

    def to_dict(self) -> dict[str, Any]:
        return {"edges": [list(e) for e in self.edges], "nodes": self.nodes, "method": self.method,
                "faithfulness": self.faithfulness, "n_edges": len(self.edges), "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        return cls([tuple(e) for e in data["edges"]], data.get("method", ""), data.get("faithfulness"),
                   data.get("metadata", {}))


def _node_sort_key(name: str) -> tuple[float, int]:
    kind, layer, head = parse_node(name)
    order = {"input": -1.0, "logits": float("inf")}.get(kind, 2 * layer + (1 if kind == "mlp" else 0))
    return order, head


def _ranked_edges(graph: AttributionGraph) -> list[tuple[str, str, float]]:
    return sorted(graph.edges(), key=lambda e: -abs(e[2]))


def prune(edges: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop edges out of nodes without inputs and into nodes without outputs, until stable."""
    current = list(dict.fromkeys(edges))
    while True:
        has_in = {v for _, v in current} | {"input"}
        has_out = {u for u, _ in current} | {"logits"}
        kept = [(u, v) for u, v in current if u in has_in and v in has_out]
        if len(kept) == len(current):
            return kept
        current = kept


def greedy_edges(graph: AttributionGraph, n: int) -> list[tuple[str, str]]:
    """Grow from logits: add the highest-|score| edge whose child is in the circuit, n times."""
    children: dict[str, list[tuple[float, str]]] = {}
    for u, v, s in graph.edges():
        children.setdefault(v, []).append((-abs(s), u))
    heap: list[tuple[float, str, str]] = [(key, u, "logits") for key, u in children.get("logits", [])]
    heapq.heapify(heap)
    chosen, in_circuit = [], {"logits"}
    while heap and len(chosen) < n:
        _, u, v = heapq.heappop(heap)
        chosen.append((u, v))
        if u not in in_circuit:
            in_circuit.add(u)
            for key, parent in children.get(u, []):
                heapq.heappush(heap, (key, parent, u))
    return chosen


def select_circuit(graph: AttributionGraph, *, method: Selection = "greedy", n_edges: int | None = None,
                   threshold: float | None = None, do_prune: bool = True) -> Circuit:
    """Select edges by `method` (top_n / greedy need n_edges, threshold needs threshold), then prune."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}: accepted are {', '.join(SELECTIONS)}")
    if method == "threshold":
        if threshold is None or threshold < 0:
            raise ValueError("method='threshold' needs threshold >= 0")
        edges = [(u, v) for u, v, s in graph.edges() if abs(s) >= threshold]
    else:
        if n_edges is None or n_edges < 0:
            raise ValueError(f"method={method!r} needs n_edges >= 0")
        edges = ([(u, v) for u, v, _ in _ranked_edges(graph)[:n_edges]] if method == "top_n"
                 else greedy_edges(graph, n_edges))
    edges = prune(edges) if do_prune else edges
    return Circuit(edges, method, None, {"n_edges_requested": n_edges, "threshold": threshold, "pruned": do_prune})


@dataclass
class FaithfulnessResult:
    faithfulness: float
    metric_circuit: float
    metric_clean: float
    metric_corrupt: float


class FaithfulnessEvaluator:
    """Runs the model with only a circuit's edges clean; prepares batches and corrupted activations once."""

    def __init__(self, model: Any, tokenizer: Any, records: Sequence[Any], *, metric: Metric = "logit_diff",
                 corruption: Corruption = "counterfactual", batch_size: int = 16, max_records: int | None = 64):
        self.model, self.metric = model, metric
        self.prep = prepare(model, tokenizer, records, metric=metric, corruption=corruption, batch_size=batch_size,
                            max_records=max_records)
        with differentiable_4bit(model):     # the fp32 dequantize path attribute() uses, on 4-bit models
            self.bases = [baseline(model, self.prep.space, b, metric, corruption) for b in self.prep.batches]
        self.n = sum(len(b.indices) for b in self.prep.batches)
        self.m_clean = float(sum(b.m_clean.sum() for b in self.bases)) / self.n
        self.m_corrupt = float(sum(b.m_corrupt.sum() for b in self.bases)) / self.n

    def metric_with(self, keep: torch.Tensor) -> float:
        with differentiable_4bit(self.model):
            total = self._sum_metric(keep)
        return total / self.n

    def _sum_metric(self, keep: torch.Tensor) -> float:
        total = 0.0
        for batch, base in zip(self.prep.batches, self.bases):
            # the clean input stream is this run's input; non-circuit edges out of `input` carry the corrupted one
            total += float(run_with_edge_edits(self.model, self.prep.space, batch, self.metric, keep,
                                               base.a_corrupt).sum())
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

    def faith(n: int) -> tuple[Circuit, float]:
        circuit = select_circuit(graph, method=method, n_edges=n)
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
        elif kind == "mlp":
            for name in node_parameters(model, layout, node):
                masks[name] = torch.ones(_logical_shape(params[name]), dtype=torch.bool)
    return masks
