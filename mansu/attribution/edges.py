"""Edge lists, rankings and pruning of an attribution graph as tensor operations over its dense [U, V] matrices.

Edges are numbered row-major over ``valid`` (the order `AttributionGraph.edges()` lists them). Each function gives
exactly what the Python loops it replaced gave, ties included (bench/graph_bench.py keeps those loops as its
reference; tests/test_attribution_graph.py compares the two on tiny models of each family and on the demo model):

* `top_order`:    the stable sort by -|score| (ties keep row-major order), as ``sorted(graph.edges(), key=-|s|)``;
* `greedy_order`: the order in which Hanna et al.'s greedy search pops edges from its heap of
  (-|score|, upstream name, downstream name), grown from ``logits`` until every edge is taken. Greedy with n edges
  is the first n of this order, so one ranking serves every n of a circuit search;
* `prune_mask`:   the fixed point of "drop edges out of nodes without inputs and into nodes without outputs".

How `greedy_order` avoids a heap pop per edge: the heap pops an edge whose parent is new exactly when that edge is
the best edge entering the circuit from outside (Prim's algorithm on the nodes), so the node join order costs one
vector minimum per node. Between two joins the available edges leave in rank order, so edge e leaves in the first
segment k, after its child joined, whose closing rank R_k is >= rank(e); the order is sorted by (segment, rank).

Memory: a few int64 / float64 vectors per edge (8 B each, ~48 B per edge: 26 MB for the 543k edges of a 32-layer
x 32-head graph) plus one int64 [U, V] rank matrix (8 B per node pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mansu.models.components import node_order


def valid_matrix(upstream: Sequence[str], downstream: Sequence[str]) -> torch.Tensor:
    """[U, V] bool: edge u -> v exists (u's output is in the stream v reads), `edge_exists` over all pairs."""
    up = torch.tensor([node_order(n) for n in upstream], dtype=torch.float64)
    down = torch.tensor([node_order(n) for n in downstream], dtype=torch.float64)
    return up[:, None] < down[None, :]


def edge_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(us, vs) int64 [E] of the existing edges, row-major."""
    us, vs = torch.nonzero(valid, as_tuple=True)
    return us, vs


def abs_scores(scores: torch.Tensor, us: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """|score| [E] in float64 (the Python floats the loops compared, so thresholds compare alike)."""
    return scores[us, vs].double().abs()


def top_order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Edge numbers [E] by decreasing |score|, ties in row-major order."""
    us, vs = edge_index(valid)
    return torch.sort(-abs_scores(scores, us, vs), stable=True).indices


def _name_ranks(names: Sequence[str]) -> torch.Tensor:
    order = sorted(range(len(names)), key=lambda i: names[i])
    ranks = torch.empty(len(names), dtype=torch.long)
    ranks[torch.tensor(order, dtype=torch.long)] = torch.arange(len(names))
    return ranks


def _heap_ranks(scores: torch.Tensor, valid: torch.Tensor, upstream: Sequence[str],
                downstream: Sequence[str]) -> torch.Tensor:
    """Rank [E] of each edge under the heap's key (-|score|, upstream name, downstream name)."""
    us, vs = edge_index(valid)
    names = _name_ranks(upstream)[us] * len(downstream) + _name_ranks(downstream)[vs]     # unique per edge
    perm = torch.sort(names).indices
    perm = perm[torch.sort(-abs_scores(scores, us, vs)[perm], stable=True).indices]
    ranks = torch.empty_like(perm)
    ranks[perm] = torch.arange(len(perm))
    return ranks


def _join_segments(rank: torch.Tensor, none: int, upstream: Sequence[str],
                   downstream: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prim's growth from logits over the [U, V] rank matrix (`none` where no edge exists, above every rank).

    Returns (closing rank of each segment [K + 1], the last one `none`; segment from which each downstream node's
    incoming edges are available [V], -1 if never)."""
    down_at = {name: j for j, name in enumerate(downstream)}
    as_down = [down_at.get(name, -1) for name in upstream]
    available = torch.full((rank.shape[1],), -1, dtype=torch.long)
    if "logits" not in down_at:
        return torch.tensor([none], dtype=torch.long), available
    available[down_at["logits"]] = 0
    best = rank[:, down_at["logits"]].clone()      # [U] best edge from each node into the circuit
    inside = torch.zeros(rank.shape[0], dtype=torch.bool)
    closing = []
    for k in range(rank.shape[0]):
        u = int(torch.argmin(best))
        if int(best[u]) >= none:
            break
        closing.append(int(best[u]))
        inside[u] = True
        if as_down[u] >= 0:
            available[as_down[u]] = k + 1
            best = torch.minimum(best, rank[:, as_down[u]])
        best.masked_fill_(inside, none)           # nodes inside are never the best outside node again
    return torch.tensor([*closing, none], dtype=torch.long), available


def greedy_order(scores: torch.Tensor, valid: torch.Tensor, upstream: Sequence[str],
                 downstream: Sequence[str]) -> torch.Tensor:
    """Edge numbers in the order greedy growth from logits takes them (edges it never reaches are left out)."""
    us, vs = edge_index(valid)
    n_edges = len(us)
    ranks = _heap_ranks(scores, valid, upstream, downstream)
    matrix = torch.full(valid.shape, n_edges, dtype=torch.long)
    matrix[us, vs] = ranks
    closing, available = _join_segments(matrix, n_edges, upstream, downstream)
    start = available[vs]                                        # [E] first segment each edge can leave in
    reached = torch.nonzero(start >= 0).flatten()
    segment = _first_closing_at_least(closing, start[reached], ranks[reached])
    key = segment * (n_edges + 1) + ranks[reached]
    return reached[torch.sort(key).indices]


def _first_closing_at_least(closing: torch.Tensor, start: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """For each query, the first k >= start with closing[k] >= rank (closing[-1] is above every rank).

    Row j of the running maxima of closing[j:], offset by j * span so that all rows form one sorted vector:
    one `searchsorted` answers every query."""
    k = len(closing)
    span = int(closing.max()) + 2
    steps = torch.arange(k)
    running = torch.where(steps[None, :] >= steps[:, None], closing[None, :], -1).cummax(dim=1).values   # [K, K]
    flat = (running + 1 + steps[:, None] * span).flatten()
    found = torch.searchsorted(flat, rank + 1 + start * span)
    return found - start * k


def prune_mask(u_ids: torch.Tensor, v_ids: torch.Tensor, n_nodes: int, source: int,
               sink: int) -> torch.Tensor:
    """[E] bool kept edges after repeatedly dropping edges out of nodes with no incoming edge (except `source`)
    and into nodes with no outgoing edge (except `sink`); nodes are ids in [0, n_nodes), -1 for absent."""
    kept = torch.ones(len(u_ids), dtype=torch.bool)
    while True:
        has_in = torch.zeros(n_nodes + 1, dtype=torch.bool)
        has_out = torch.zeros(n_nodes + 1, dtype=torch.bool)
        has_in[v_ids[kept]] = True
        has_out[u_ids[kept]] = True
        has_in[source], has_out[sink] = True, True
        now = kept & has_in[u_ids] & has_out[v_ids]
        if int(now.sum()) == int(kept.sum()):
            return now
        kept = now
