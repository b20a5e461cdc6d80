"""Array operations on a `GraphData` for the circuit explorer: pruning with the pruned mass reported, grouping the
heads of each layer, node search, two graphs aligned on one edge list, the CAD split per edge, the subgraph of
pinned nodes, subgraph export.

Everything is vectorised over edges (numpy; a 543k-edge graph prunes in one argpartition). Memory: a few int64 /
float64 vectors per edge (8 B each: ~40 B per edge, ~22 MB for 543k edges) and nothing per node pair.

The CAD split (`cad_split`) is `mansu.attribution.cad_parts` (its totals come from `parts_of`, the one formula):
over the original circuit's edges C, with S = sum_C |s_e| (before), T = sum_C |t_e| (after) and sigma = -1 when the
circuit as a whole flipped sign (sum_C |s_e + t_e| < sum_C |s_e - t_e|), else +1,

    CAD = sum_C |s_e - t_e| / (S + T) = shrinkage + reversal + rerouting,   shrinkage = |S - T| / (S + T),

reversal = CAD - CAD(sigma s, t) (the readout flipped, every edge with it; 0 when sigma = +1) and rerouting the rest.
Per edge (each edge's share of CAD is |s_e - t_e| / (S + T), and the three per-edge parts add up to it):

* reversal is shared among the edges that flipped sign (s_e t_e < 0) in proportion to 2 min(|s_e|, |t_e|), their
  share of CAD that the global flip explains (0 for every edge when sigma = +1);
* shrinkage, the net scale change, is shared among the edges whose magnitude moved with the net change (shrank
  when T < S) in proportion to m_e = ||s_e| - |t_e|| / (S + T);
* rerouting is the rest of the edge's share: flips against the circuit's orientation (sigma s_e t_e < 0), and
  magnitude moving against the net change (redistribution among the circuit's edges).

An edge's class (its colour in the diff view): a circuit edge that flipped against the circuit's orientation or grew
is rerouting; one that flipped with a reversed circuit (and did not grow) is reversal; one that kept its sign and
shrank is shrinkage; outside the circuit, an edge whose |score| grew is "grew outside circuit". Attribution moving
onto edges outside the circuit is rerouting too, but CAD does not see it: it is reported beside CAD as
`outside_gain` = sum over edges outside C of max(|t_e| - |s_e|, 0), in the same units (/(S + T)).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mansu.viz.artifacts import GraphData

GROUP_NODE_LIMIT = 300   # above this many nodes the explorer draws one node per layer's heads by default
EdgeClass = Literal["shrinkage", "reversal", "rerouting", "grew outside circuit", "outside circuit", "unchanged"]
EDGE_CLASSES: tuple[EdgeClass, ...] = ("shrinkage", "reversal", "rerouting", "grew outside circuit",
                                       "outside circuit", "unchanged")


# ------------------------------------------------------------------------------------------------------- pruning

@dataclass(frozen=True)
class Pruned:
    """The kept edges (indices, by decreasing |score|) and what pruning left out."""

    kept: np.ndarray          # [k] int64 edge indices
    n_edges: int
    kept_mass: float          # sum of |score| over kept edges / over all edges (1.0 for an empty graph)

    @property
    def pruned_mass(self) -> float:
        return 1.0 - self.kept_mass

    def summary(self) -> str:
        """'2,000 of 543,072 edges drawn, carrying 12.3% of the total |score| (87.7% pruned)'."""
        return (f"{self.kept.shape[0]:,} of {self.n_edges:,} edges drawn, carrying {100 * self.kept_mass:.3g}% of "
                f"the total |score| ({100 * self.pruned_mass:.3g}% pruned)")


def top_edges(weight: np.ndarray, k: int | None, threshold: float = 0.0) -> np.ndarray:
    """Indices of the k largest |weight| at or above `threshold`, by decreasing |weight| (ties in index order)."""
    mag = np.abs(np.asarray(weight, dtype=np.float64))
    candidates = np.flatnonzero(mag >= threshold) if threshold > 0 else np.arange(mag.shape[0])
    k = candidates.shape[0] if k is None else min(k, candidates.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < candidates.shape[0]:
        candidates = np.sort(candidates[np.argpartition(-mag[candidates], k - 1)[:k]])
    return candidates[np.argsort(-mag[candidates], kind="stable")]


def prune(weight: np.ndarray, top_k: int | None, threshold: float = 0.0) -> Pruned:
    """Top-k edges by |score| (at or above `threshold`) with the share of |score| they carry."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for every edge), got {top_k}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    kept = top_edges(weight, top_k, threshold)
    mag = np.abs(np.asarray(weight, dtype=np.float64))
    total = float(mag.sum())
    left_out = max(0.0, total - float(mag[kept].sum())) if kept.shape[0] < mag.shape[0] else 0.0
    return Pruned(kept, int(mag.shape[0]), 1.0 - left_out / total if total > 0 else 1.0)


# ------------------------------------------------------------------------------------------------------- grouping

def group_name(name: str) -> str:
    """`a3.h7` -> `a3.*` (all heads of layer 3); every other node is its own group."""
    return name.split(".h")[0] + ".*" if name.startswith("a") and ".h" in name else name


def group_by_layer(graph: GraphData) -> GraphData:
    """The graph with each layer's heads merged into one node `a{L}.*`: edge scores summed (signed) over the merged
    edges, node scores summed, a group in the circuit when any member is. meta['members'] maps group -> nodes."""
    groups = list(dict.fromkeys(group_name(n) for n in graph.names))
    gid = {g: i for i, g in enumerate(groups)}
    of = np.array([gid[group_name(n)] for n in graph.names], dtype=np.int64)        # [n_nodes] group of each node
    key = of[graph.src] * len(groups) + of[graph.dst]
    uniq, inverse = np.unique(key, return_inverse=True)
    members: dict[str, list[str]] = {g: [] for g in groups}
    for name in graph.names:
        members[group_name(name)].append(name)
    layers = np.zeros(len(groups), dtype=np.int64)
    layers[of] = graph.layers
    at = graph.index()
    return GraphData(
        names=groups, layers=layers, scores=np.bincount(of, weights=graph.scores, minlength=len(groups)),
        params=[graph.params[at[members[g][0]]] if len(members[g]) == 1 else [] for g in groups],
        src=uniq // len(groups), dst=uniq % len(groups),
        weight=np.bincount(inverse, weights=graph.weight, minlength=uniq.shape[0]),
        in_circuit=np.bincount(of, weights=graph.in_circuit.astype(np.float64), minlength=len(groups)) > 0,
        meta={**graph.meta, "grouped": True, "members": members})


# ------------------------------------------------------------------------------------------------------- search

def search_nodes(names: list[str], query: str, limit: int = 50) -> list[str]:
    """Node names containing `query` (case-insensitive; several terms separated by spaces or commas match any),
    exact matches first; [] for an empty query."""
    terms = [t for t in query.lower().replace(",", " ").split() if t]
    if not terms:
        return []
    exact = [n for n in names if n.lower() in terms]
    partial = [n for n in names if n not in exact and any(t in n.lower() for t in terms)]
    return (exact + partial)[:limit]


def node_label(name: str) -> str:
    """A human label: 'embedding (input)', 'layer 3 head 7', 'layer 3 MLP', 'layer 3 heads (all)', 'logits'."""
    if name == "input":
        return "embedding (input)"
    if name == "logits":
        return "logits (output)"
    if name.startswith("a") and name.endswith(".*"):
        return f"layer {name[1:-2]} heads (all)"
    if name.startswith("a") and ".h" in name:
        layer, head = name[1:].split(".h")
        return f"layer {layer} head {head}"
    if name.startswith("m") and name[1:].isdigit():
        return f"layer {name[1:]} MLP"
    return name


def node_kind(name: str) -> str:
    """'head', 'heads' (a grouped layer), 'mlp', 'input' or 'logits'."""
    if name in ("input", "logits"):
        return name
    if name.startswith("a"):
        return "heads" if name.endswith(".*") else "head"
    return "mlp"


# ------------------------------------------------------------------------------------------------------- diff

@dataclass(frozen=True)
class GraphDiff:
    """Two graphs on one edge list (the union of their edges; 0 where a graph lacks an edge) and one node list."""

    names: list[str]
    layers: np.ndarray        # [n_nodes]
    src: np.ndarray           # [n_edges] int64
    dst: np.ndarray           # [n_edges] int64
    before: np.ndarray        # [n_edges] float64, s_e
    after: np.ndarray         # [n_edges] float64, t_e
    in_circuit: np.ndarray    # [n_edges] bool, edge of the original circuit

    def change(self, relative: bool = False) -> np.ndarray:
        """after - before; relative: divided by |before|, floored at 0.1% of the largest |before| (so an edge that
        appears from nothing is finite) and clipped to +-2 (+-200%)."""
        delta = self.after - self.before
        if not relative:
            return delta
        floor = 1e-3 * float(np.abs(self.before).max(initial=0.0)) or 1e-12
        return np.clip(delta / np.maximum(np.abs(self.before), floor), -2.0, 2.0)


def _edge_keys(graph: GraphData, index: dict[str, int], n: int) -> np.ndarray:
    remap = np.array([index[name] for name in graph.names], dtype=np.int64)
    return remap[graph.src] * n + remap[graph.dst]


def align(before: GraphData, after: GraphData, circuit_edges: list[tuple[str, str]] | None = None) -> GraphDiff:
    """`before` and `after` on the union of their edges, node order from `before` (the fixed layout)."""
    names = list(dict.fromkeys([*before.names, *after.names]))
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    kb, ka = _edge_keys(before, index, n), _edge_keys(after, index, n)
    keys = np.sort(np.concatenate([kb, ka]), kind="stable")      # a sort beats np.union1d's hashing 10x here
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.shape[0] else keys
    s, t = np.zeros(keys.shape[0]), np.zeros(keys.shape[0])
    s[np.searchsorted(keys, kb)] = before.weight                    # each graph lists an edge once
    t[np.searchsorted(keys, ka)] = after.weight
    layers = np.zeros(n, dtype=np.int64)
    layers[[index[x] for x in after.names]] = after.layers
    layers[[index[x] for x in before.names]] = before.layers
    circ = np.zeros(keys.shape[0], dtype=bool)
    wanted = [index[u] * n + index[v] for u, v in (circuit_edges or []) if u in index and v in index]
    if wanted:
        pos = np.searchsorted(keys, wanted)
        ok = (pos < keys.shape[0]) & (keys[np.minimum(pos, keys.shape[0] - 1)] == wanted)
        circ[pos[ok]] = True
    return GraphDiff(names, layers, keys // n, keys % n, s, t, circ)


def circuit_edges_of(*sources: Any) -> list[tuple[str, str]]:
    """The original circuit's edges from the first source that has them: a circuit dict ({'edges': [[u, v]]}), a
    graph's meta (its 'circuit' entry) or a CAD stage dict ({'per_edge': {'u->v': c}}); [] when none has."""
    for src in sources:
        if not isinstance(src, dict):
            continue
        if isinstance(src.get("circuit"), dict):
            src = src["circuit"]
        if src.get("edges"):
            return [(str(u), str(v)) for u, v in src["edges"]]
        if isinstance(src.get("per_edge"), dict) and src["per_edge"]:
            return [tuple(k.split("->", 1)) for k in src["per_edge"]]  # type: ignore[misc]
    return []


@dataclass(frozen=True)
class CADSplit:
    """CAD over the circuit's edges split into shrinkage, reversal and rerouting (rule: module docstring); per-edge
    arrays are in CAD units (/(S+T)) and 0 outside the circuit."""

    cad: float
    shrinkage: float
    reversal: float
    rerouting: float
    outside_gain: float
    edge_shrinkage: np.ndarray     # [n_edges]
    edge_reversal: np.ndarray      # [n_edges]
    edge_rerouting: np.ndarray     # [n_edges]
    edge_class: np.ndarray         # [n_edges] object: one of EDGE_CLASSES


def _circuit_parts(s: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """cad_parts' point values (cad, shrinkage, reversal, rerouting) of circuit scores s, t [E_C]."""
    import torch

    from mansu.attribution.cad_parts import parts_of

    zero = torch.zeros((), dtype=torch.float64)
    parts = parts_of(torch.from_numpy(s), torch.from_numpy(t), zero, zero)
    return {p: float(parts[p]) for p in ("cad", "shrinkage", "reversal", "rerouting")}


def _shares(total: float, weight: np.ndarray) -> np.ndarray:
    """`total` shared in proportion to `weight` (0 everywhere when the weights sum to 0)."""
    pool = float(weight.sum())
    return weight * (total / pool) if pool > 0 else np.zeros_like(weight)


def cad_split(diff: GraphDiff) -> CADSplit:
    """The CAD split of `diff` over its circuit edges (module docstring)."""
    s, t, circ = diff.before, diff.after, diff.in_circuit
    n = s.shape[0]
    den = float(np.abs(s[circ]).sum() + np.abs(t[circ]).sum())
    if den <= 0:
        zeros = np.zeros(n)
        return CADSplit(0.0, 0.0, 0.0, 0.0, 0.0, zeros, zeros, zeros, np.full(n, "unchanged", dtype=object))
    parts = _circuit_parts(np.ascontiguousarray(s[circ]), np.ascontiguousarray(t[circ]))
    sigma = -1.0 if parts["reversal"] > 0 else 1.0                 # reversal > 0 exactly when the circuit flipped
    flip = circ & (s * t < 0)
    against = circ & (sigma * s * t < 0)                           # flipped against the circuit's orientation
    edge_reversal = _shares(parts["reversal"], np.where(flip, 2 * np.minimum(np.abs(s), np.abs(t)), 0.0) / den)
    magnitude = np.where(circ, np.abs(np.abs(s) - np.abs(t)), 0.0) / den
    net = float(np.abs(s[circ]).sum() - np.abs(t[circ]).sum())            # > 0: the circuit's attribution shrank
    with_net = circ & ((np.abs(s) - np.abs(t)) * np.sign(net) > 0)
    edge_shrink = _shares(parts["shrinkage"], np.where(with_net, magnitude, 0.0))
    edge_reroute = np.where(circ, np.abs(s - t) / den - edge_shrink - edge_reversal, 0.0).clip(min=0.0)
    grew = np.abs(t) > np.abs(s)
    outside = ~circ & grew
    classes = np.full(n, "unchanged", dtype=object)
    classes[circ & ~against & ~grew & (np.abs(t) < np.abs(s))] = "shrinkage"
    classes[flip & ~against & ~grew] = "reversal"
    classes[circ & (against | grew)] = "rerouting"
    classes[~circ & (s != t)] = "outside circuit"
    classes[outside] = "grew outside circuit"
    return CADSplit(parts["cad"], parts["shrinkage"], parts["reversal"], parts["rerouting"],
                    float((np.abs(t) - np.abs(s))[outside].sum()) / den, edge_shrink, edge_reversal, edge_reroute,
                    classes)


def node_split(diff: GraphDiff, split: CADSplit, limit: int = 20) -> list[dict[str, Any]]:
    """Per node: the CAD shrinkage, reversal and rerouting of the circuit edges it touches (an edge counts at both
    ends), the largest total first, as table rows."""
    n = len(diff.names)

    def per_node(edge_part: np.ndarray) -> np.ndarray:
        return np.bincount(diff.src, edge_part, n) + np.bincount(diff.dst, edge_part, n)

    shrink, reverse, reroute = (per_node(p) for p in (split.edge_shrinkage, split.edge_reversal,
                                                      split.edge_rerouting))
    total = shrink + reverse + reroute
    order = np.argsort(-total, kind="stable")[:limit]
    return [{"node": diff.names[i], "label": node_label(diff.names[i]), "shrinkage": round(float(shrink[i]), 4),
             "reversal": round(float(reverse[i]), 4), "rerouting": round(float(reroute[i]), 4)}
            for i in order if total[i] > 0]


# ------------------------------------------------------------------------------------------------------- pins

def pin_mask(graph: GraphData, pins: list[str]) -> np.ndarray:
    """[n_nodes] bool: the pinned nodes (names not in the graph are ignored)."""
    at = graph.index()
    mask = np.zeros(len(graph.names), dtype=bool)
    mask[[at[p] for p in pins if p in at]] = True
    return mask


def pin_subgraph(graph: GraphData, pins: list[str], threshold: float = 0.0) -> np.ndarray:
    """The subgraph of the pins: every edge with an end at a pinned node (so every edge among the pins too) with
    |score| >= threshold, as edge indices by decreasing |score|."""
    pinned = pin_mask(graph, pins)
    sel = np.flatnonzero((pinned[graph.src] | pinned[graph.dst]) & (np.abs(graph.weight) >= threshold))
    return sel[np.argsort(-np.abs(graph.weight[sel]), kind="stable")]


# ------------------------------------------------------------------------------------------------------- export

def subgraph_csv(graph: GraphData, kept: np.ndarray, circuit_edges: list[tuple[str, str]] | None = None) -> str:
    """The kept edges as CSV: source, target, their labels and layers, score, and whether the edge is in the
    circuit (rows by decreasing |score|)."""
    circuit = set(circuit_edges or [])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["source", "target", "source_label", "target_label", "source_layer", "target_layer", "score",
                     "in_circuit"])
    for s, d, w in zip(graph.src[kept].tolist(), graph.dst[kept].tolist(), graph.weight[kept].tolist()):
        u, v = graph.names[s], graph.names[d]
        writer.writerow([u, v, node_label(u), node_label(v), int(graph.layers[s]), int(graph.layers[d]),
                         f"{w:.6g}", (u, v) in circuit])
    return out.getvalue()


def subgraph_tracer_json(graph: GraphData, kept: np.ndarray, *, slug: str, prompt: str = "") -> dict[str, Any]:
    """The kept edges in circuit-tracer's graph JSON shape (`mansu.attribution.serialize.to_circuit_tracer`, whose
    node ids, link sign and clerp labels it keeps); only ungrouped graphs (real node names) can be exported."""
    import torch

    from mansu.attribution.eap import AttributionGraph
    from mansu.attribution.serialize import to_circuit_tracer

    if graph.meta.get("grouped"):
        raise ValueError("a grouped graph has no circuit-tracer node ids: export the ungrouped graph's edges")
    up = [n for n in graph.names if n != "logits"]
    down = [n for n in graph.names if n != "input"]
    ui, di = {n: i for i, n in enumerate(up)}, {n: i for i, n in enumerate(down)}
    us = torch.tensor([ui[graph.names[s]] for s in graph.src[kept].tolist()], dtype=torch.long)
    vs = torch.tensor([di[graph.names[d]] for d in graph.dst[kept].tolist()], dtype=torch.long)
    scores = torch.zeros(len(up), len(down))
    valid = torch.zeros(len(up), len(down), dtype=torch.bool)
    scores[us, vs] = torch.tensor(graph.weight[kept], dtype=torch.float32)
    valid[us, vs] = True
    heads = _heads_and_layers(graph.names)
    meta = {**(graph.meta.get("metadata") or {}), "n_layers": heads[0], "n_heads": heads[1]}
    sub = AttributionGraph(up, down, scores, valid, torch.zeros(0), torch.zeros(0), None, meta)
    data = to_circuit_tracer(sub, slug=slug, prompt=prompt)
    labels = {node["clerp"]: node_label(node["clerp"]) for node in data["nodes"]}
    data["nodes"] = [{**node, "clerp": f"{node['clerp']} ({labels[node['clerp']]})"} for node in data["nodes"]]
    return data


def _heads_and_layers(names: list[str]) -> tuple[int, int]:
    """(n_layers, n_heads) from node names (the largest layer and head index + 1)."""
    layers = [int(n[1:].split(".h")[0]) for n in names if n.startswith("a") and ".h" in n]
    layers += [int(n[1:]) for n in names if n.startswith("m") and n[1:].isdigit()]
    heads = [int(n.split(".h")[1]) for n in names if n.startswith("a") and ".h" in n]
    return (max(layers) + 1 if layers else 0), (max(heads) + 1 if heads else 0)
