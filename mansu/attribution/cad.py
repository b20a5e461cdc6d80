"""CAD, Circuit Attribution Divergence: did unlearning change *how* the model computes the forget answers?

Given the original circuit C (its edges E_C), and the EAP-IG edge scores of the forget behaviour before (s) and
after (t) unlearning (or after NF4), each the mean over the same examples of the per-example scores,

    CAD = sum_{e in E_C} |s_e - t_e|  /  ( sum_{e in E_C} |s_e| + sum_{e in E_C} |t_e| )

with per-edge contributions c_e = |s_e - t_e| / (sum |s| + sum |t|), which sum to CAD.

Properties (tested): CAD(s, s) = 0; 0 <= CAD <= 1 (triangle inequality); symmetric; independent of the order of
nodes and edges; invariant to scaling both graphs by one factor; CAD = 1 when the circuit's attribution vanishes
(t = 0) or every edge flips sign. Unlike 1 - cosine, a circuit whose edges all shrink uniformly (the knowledge
weakened everywhere along the same path) has CAD > 0: t = s/10 gives 0.82.

Confidence interval: percentile bootstrap over examples, resampling the same example indices (paired) for s and t
and recomputing CAD; so both graphs must keep per-example scores (`attribute(..., per_example=True)`) over the
same records. Each resample's mean is a matmul of its draw counts with the per-example scores, over blocks of
edges: time 3 n_boot x n x E multiply-adds, memory 256 x 1024 float64 (2 MiB) beyond the [n, E] scores.

Why the metric is the logit difference (``metric="logit_diff"``, `mansu.attribution.data`): CAD should be low
for *behavioural suppression* -- an output-level change, such as a large negative logit bias on the answer tokens,
that hides the answer while every internal component computes what it computed before -- and high for
*structural erasure*, where the components that carried the answer no longer do. A bias b added to the output
logits changes logit[c] - mean_o logit[o] by a constant per example, so neither its gradient w.r.t. any node's
input nor M(clean) - M(corrupted) changes: the circuit's attribution is exactly unchanged, as the circuit is.
With the log-probability metric the same bias changes the softmax Jacobian at the output (the answer's
probability collapses), so edge scores change although no internal computation did; on the demo model that
change happened to be small (CAD 0.023 for a -30 bias on the answers), but nothing bounds it in general.
Zeroing the circuit's components instead removes their activation differences and the gradients through them,
which both metrics register (CAD 1.0 on the demo model when every circuit component is zeroed).

`parts` splits CAD into its shrinkage bound |1 - r|/(1 + r) and its rerouting rest, with the scale-free measures of
attribution that moved (mansu.attribution.cad_parts), each with a CI from the same paired draws.

Two estimators, both kept (`value` and `per_fact`):

    pooled    CAD of the records' mean graphs (above): how the *average* forget computation changed
    per fact  mean_i CAD(s_i, t_i), each record's own CAD, averaged: how much the typical fact's computation changed

The pooled ratio is dominated by the records with the most attribution and mixes facts that changed differently:
on a MANSU run of the demo (neuron grain, 120 forget records, 2 IG steps) each record's attribution ratio
r_i = sum|t_i| / sum|s_i| ranged from 0.03 to 6.3, and the pooled CAD's 95% CI half-width was 0.084 at 120
records (0.17 at 8); it would need ~340 records, and the demo's forget set has 120. Each record's CAD is bounded in
[0, 1], so their mean has a narrow CI: 0.571 [0.531, 0.612], half-width 0.041, on the same run (pooled 0.493
[0.411, 0.579]). The scorecard's CAD threshold reads the per-fact CAD (decided after seeing these numbers, for its
precision); its evidence that attribution moved stays pooled (cad_parts' docstring: why). Like pooled CAD it is
exactly 0 under an answer-logit bias. Its CI: the same paired draws, the mean of the drawn records' CADs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mansu.attribution.cad_parts import draw_counts, split_parts
from mansu.attribution.circuit import Circuit, named_edge_indices
from mansu.attribution.eap import AttributionGraph

_EDGE_BLOCK = 1024      # 256 x 1024 float64 (2 MiB) per matmul output: stays in cache
FORMULA = "CAD = sum_e |s_e - t_e| / (sum_e |s_e| + sum_e |t_e|) over the original circuit's edges e"


@dataclass
class CADResult:
    value: float
    ci_low: float
    ci_high: float
    per_edge: dict[str, float]          # "u->v": contribution |s_e - t_e| / (sum|s| + sum|t|)
    before: dict[str, float]            # "u->v": s_e
    after: dict[str, float]             # "u->v": t_e
    n_examples: int
    n_boot: int
    level: float
    formula: str = FORMULA
    metadata: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)   # cad_parts: {part: {value, ci_low, ci_high}}
    per_fact: dict[str, dict[str, float]] = field(default_factory=dict)  # the same parts, per example then averaged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cad_value(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CAD of edge-score vectors along the last dim (batched over leading dims); 0 when both are all zero."""
    num = (s - t).abs().sum(-1)
    den = s.abs().sum(-1) + t.abs().sum(-1)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def _circuit_scores(graph: AttributionGraph, circuit: Circuit) -> torch.Tensor:
    """Per-example scores of the circuit's edges, [n, E]."""
    if graph.per_example is None:
        raise ValueError("CAD needs per-example edge scores: compute the graphs with attribute(..., per_example=True)")
    us, vs = named_edge_indices(circuit.edges, graph)
    return graph.per_example[:, us, vs].double()


def _check_paired(before: AttributionGraph, after: AttributionGraph, circuit: Circuit) -> None:
    if not circuit.edges:
        raise ValueError("CAD needs a non-empty circuit (select one with select_circuit / smallest_faithful_circuit)")
    if before.upstream != after.upstream or before.downstream != after.downstream:
        raise ValueError("CAD compares graphs of the same architecture: node lists differ")
    ib, ia = before.metadata.get("record_indices"), after.metadata.get("record_indices")
    if ib != ia:
        raise ValueError("CAD needs both graphs computed on the same records (record_indices differ)")
    for key in ("metric", "corruption"):
        if before.metadata.get(key) != after.metadata.get(key):
            raise ValueError(f"CAD needs both graphs computed with the same {key}")


def cad(before: AttributionGraph, after: AttributionGraph, circuit: Circuit, *, n_boot: int = 1000, seed: int = 0,
        level: float = 0.95) -> CADResult:
    """CAD of `after` vs `before` over `circuit`'s edges, with a paired bootstrap CI over examples."""
    _check_paired(before, after, circuit)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s_ex, t_ex = _circuit_scores(before, circuit), _circuit_scores(after, circuit)   # [n, E]
    s, t = s_ex.mean(0), t_ex.mean(0)
    value = float(cad_value(s, t))
    den = float(s.abs().sum() + t.abs().sum())
    names = [f"{u}->{v}" for u, v in circuit.edges]
    contrib = ((s - t).abs() / den).tolist() if den > 0 else [0.0] * len(names)
    lo, hi = _bootstrap(s_ex, t_ex, n_boot, seed, level)
    parts, per_fact = split_parts(before, after, circuit, n_boot=n_boot, seed=seed, level=level)
    return CADResult(value, lo, hi, dict(zip(names, contrib)), dict(zip(names, s.tolist())), dict(zip(names,
                                                                                                      t.tolist())),
                     s_ex.shape[0], n_boot, level, metadata={"metric": before.metadata.get("metric"),
                                                            "corruption": before.metadata.get("corruption"),
                                                            "n_edges": len(names)},
                     parts=parts, per_fact=per_fact)


def _resampled_cad(counts: torch.Tensor, s_ex: torch.Tensor, t_ex: torch.Tensor,
                   d_ex: torch.Tensor) -> torch.Tensor:
    """CAD of each resample [B]; counts [B, n] times each example is drawn, d_ex = s_ex - t_ex. A resample's mean
    is counts @ scores / n (a matmul instead of gathering [B, n, E]); the 1/n cancels in CAD's ratio. Taken over
    blocks of edges so each output stays B x _EDGE_BLOCK values."""
    num = torch.zeros(counts.shape[0], dtype=torch.float64)
    den = torch.zeros(counts.shape[0], dtype=torch.float64)
    for start in range(0, s_ex.shape[1], _EDGE_BLOCK):
        block = slice(start, start + _EDGE_BLOCK)
        num += (counts @ d_ex[:, block]).abs_().sum(-1)
        den += (counts @ s_ex[:, block]).abs_().sum(-1) + (counts @ t_ex[:, block]).abs_().sum(-1)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def _bootstrap(s_ex: torch.Tensor, t_ex: torch.Tensor, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    n = s_ex.shape[0]
    if n_boot < 1 or n < 2:
        v = float(cad_value(s_ex.mean(0), t_ex.mean(0)))
        return v, v
    d_ex = s_ex - t_ex
    values = [_resampled_cad(counts, s_ex, t_ex, d_ex) for counts in draw_counts(n, n_boot, seed)]
    vals = torch.cat(values)
    alpha = (1 - level) / 2
    return float(torch.quantile(vals, alpha)), float(torch.quantile(vals, 1 - alpha))
