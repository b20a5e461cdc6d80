"""Loaders for run artifacts: each returns None when the artifact is missing or unreadable.

File names come only from `mansu.runs.layout`. Graph JSON is normalised into `GraphData`
(dense numpy arrays) so figure builders stay fast on 30k+ edges.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mansu.runs import layout
from mansu.runs.store import artifact

log = logging.getLogger(__name__)


def read_json_or_none(path: Path) -> Any | None:
    """The parsed JSON at `path`, or None when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


@dataclass(frozen=True)
class GraphData:
    """A component graph: node names with layer/score/owned parameters and edges as index arrays."""

    names: list[str]
    layers: np.ndarray        # [n_nodes] int, -1 for input, n_layers for logits
    scores: np.ndarray        # [n_nodes] float
    params: list[list[str]]   # names of the parameters each node owns a slice of ([] when unknown)
    src: np.ndarray           # [n_edges] int index into names
    dst: np.ndarray           # [n_edges] int
    weight: np.ndarray        # [n_edges] float edge score
    in_circuit: np.ndarray    # [n_nodes] bool: node belongs to the selected circuit
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.weight.shape[0])

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def node_layer(name: str, n_layers: int) -> int:
    """Layer of a node name: `input` -> -1, `a{L}.h{H}` / `m{L}` -> L, `logits` -> n_layers."""
    if name == "input":
        return -1
    if name == "logits":
        return n_layers
    if name.startswith("a") and ".h" in name:
        return int(name[1:].split(".h")[0])
    if name.startswith("m") and name[1:].isdigit():
        return int(name[1:])
    raise ValueError(f"unknown node name {name!r}: expected input, a{{L}}.h{{H}}, m{{L}} or logits")


def _max_layer(names: list[str]) -> int:
    layers = [node_layer(n, 0) for n in names if n not in ("input", "logits")]
    return (max(layers) + 1) if layers else 0


def _edge_fields(link: dict[str, Any]) -> tuple[str, str, float]:
    src = link.get("source", link.get("src", link.get("from")))
    dst = link.get("target", link.get("dst", link.get("to")))
    weight = link.get("weight", link.get("score", 0.0))
    return str(src), str(dst), float(weight)


def _owned(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(k) for k in value]
    return []


def _layer(node: dict[str, Any], name: str, n_layers: int) -> int:
    layer = node.get("layer")
    return node_layer(name, n_layers) if name in ("input", "logits") or not isinstance(layer, int) else layer


def graph_from_dict(data: dict[str, Any]) -> GraphData:
    """Normalise a graph JSON (`nodes` + `links`/`edges`) into arrays; raises ValueError if malformed."""
    if not isinstance(data, dict) or "nodes" not in data:
        raise ValueError("graph JSON must be an object with 'nodes' and 'links' (or 'edges')")
    raw_nodes = data["nodes"]
    nodes = [n if isinstance(n, dict) else {"name": n} for n in raw_nodes]
    names = [str(n.get("name", n.get("id", n.get("node_id")))) for n in nodes]
    links = data.get("links", data.get("edges", []))
    edges = [_edge_fields(link) for link in links]
    known = set(names)
    for s, d, _ in edges:  # edges may name nodes absent from the node list
        for name in (s, d):
            if name not in known:
                known.add(name)
                names.append(name)
                nodes.append({"name": name})
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    n_layers = int(data.get("n_layers") or meta.get("n_layers") or _max_layer(names))
    idx = {name: i for i, name in enumerate(names)}
    return GraphData(
        names=names,
        layers=np.array([_layer(n, nm, n_layers) for n, nm in zip(nodes, names)], dtype=np.int64),
        scores=np.array([float(n.get("score") or 0.0) for n in nodes]),
        params=[_owned(n.get("params")) for n in nodes],
        src=np.array([idx[s] for s, _, _ in edges], dtype=np.int64),
        dst=np.array([idx[d] for _, d, _ in edges], dtype=np.int64),
        weight=np.array([w for _, _, w in edges], dtype=np.float64),
        in_circuit=np.array([bool(n.get("in_circuit", False)) for n in nodes], dtype=bool),
        meta={k: v for k, v in data.items() if k not in ("nodes", "links", "edges")},
    )


def with_dense_edges(graph: GraphData, upstream: list[str], downstream: list[str], scores: Any,
                     valid: Any) -> GraphData:
    """`graph` with every edge of the dense [U, V] `scores` where `valid` (row-major, as
    `mansu.attribution.edges.edge_index` lists them): the JSON's links may hold only the largest (save_graph's
    max_links), the tensors hold all. Node names not in `graph` raise ValueError."""
    from mansu.attribution.edges import edge_index

    at = graph.index()
    missing = sorted((set(upstream) | set(downstream)) - set(at))
    if missing:
        raise ValueError(f"dense graph names nodes absent from its JSON: {missing[:5]}")
    us, vs = edge_index(valid.bool())
    up = np.array([at[n] for n in upstream], dtype=np.int64)
    down = np.array([at[n] for n in downstream], dtype=np.int64)
    return GraphData(graph.names, graph.layers, graph.scores, graph.params, up[us.numpy()], down[vs.numpy()],
                     scores[us, vs].double().numpy(), graph.in_circuit, graph.meta)


def _dense_tensors(run_dir: Path, stage: str) -> tuple[Any, Any] | None:
    """(scores, valid) of a stage's safetensors, without its per-example scores; None when absent or unreadable."""
    path = artifact(run_dir, layout.attribution_tensors(Path(run_dir), stage))
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("scores"), f.get_tensor("valid")
    except Exception as exc:  # a torn or foreign file: fall back to the JSON's links
        log.warning("could not read %s: %s", path, exc)
        return None


def load_graph(run_dir: Path, stage: str) -> GraphData | None:
    """The attribution graph of one stage (before, after_fp, after_nf4), or None when missing. Edges come from the
    stage's dense safetensors when it has one (every edge, however many links the JSON kept), else the JSON."""
    if stage not in layout.ATTRIBUTION_STAGES:
        raise ValueError(f"unknown attribution stage {stage!r}: accepted are {', '.join(layout.ATTRIBUTION_STAGES)}")
    data = read_json_or_none(artifact(run_dir, layout.attribution_json(Path(run_dir), stage)))  # --from-run: parent's
    if data is None:
        return None
    try:
        dense = _dense_tensors(run_dir, stage) if "upstream" in data and "downstream" in data else None
        if dense is not None:
            nodes_only = graph_from_dict({**data, "links": []})
            return with_dense_edges(nodes_only, data["upstream"], data["downstream"], *dense)
        return graph_from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("malformed graph %s/%s: %s", run_dir, stage, exc)
        return None


def load_update(run_dir: Path) -> dict[str, Any] | None:
    """update.safetensors (delta and bin widths of updated parameters) as CPU tensors, or None."""
    path = Path(run_dir) / layout.UPDATE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # a torn or foreign file must not break the page
        log.warning("could not read %s: %s", path, exc)
        return None
