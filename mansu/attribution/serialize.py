"""Attribution artifacts: graph JSON + dense safetensors (run-folder names from `mansu.runs.layout`), circuits and
their parameter masks, and an export to circuit-tracer's graph JSON (``metadata``, ``qParams``, ``nodes``, ``links``).

Graph JSON: ``{"metadata", "upstream", "downstream", "nodes": [{"name", "kind", "layer", "head", "score",
"params", "in_circuit"}], "links": [{"source", "target", "weight"}]}``. A node's score is the sum of |score| over
its outgoing edges (for ``logits``: over its incoming edges). ``links`` hold every existing edge (the largest
`max_links` by |score| when set); the safetensors file holds the dense ``scores`` [U, V], ``valid``,
``metric_clean``/``metric_corrupt`` and, when kept, ``per_example`` [n, U, V].

circuit-tracer export: node ids follow its conventions (``E_0_0`` for the input, ``{layer}_{index}_0`` for heads
and MLPs, where an MLP takes index n_heads, and ``{n_layers + 1}_0_0`` for the logit target); ``clerp`` carries our
node name; positions are summed, so ctx_idx is 0. Link weights are ``-score``: positive when corrupting the edge
lowers the metric, i.e. when the edge supports the answer, as in circuit-tracer's direct effects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mansu.attribution.circuit import Circuit, circuit_parameter_masks
from mansu.attribution.eap import AttributionGraph
from mansu.io import (
    portable_path,
    portable_paths,
    read_json,
    read_safetensors,
    write_json_atomic,
    write_safetensors_atomic,
)
from mansu.models.components import (
    head_parameter_slices,
    mlp_neuron_axes,
    model_layout,
    node_parameters,
    parse_node,
)
from mansu.runs import layout as run_layout
from mansu.runs.store import artifact


def node_scores(graph: AttributionGraph) -> dict[str, float]:
    """Sum of |score| over each node's outgoing edges (logits: incoming)."""
    out = {name: float(graph.scores[i].abs().sum()) for i, name in enumerate(graph.upstream)}
    out["logits"] = float(graph.scores[:, -1].abs().sum())
    return out


def graph_to_json(graph: AttributionGraph, *, model: Any = None, circuit: Circuit | None = None,
                  max_links: int | None = None) -> dict[str, Any]:
    """The graph as a JSON-ready dict (nodes with layer, score, owned parameters; links with weight)."""
    scores = node_scores(graph)
    in_circuit = set(circuit.nodes) if circuit else set()
    layout = model_layout(model) if model is not None else None
    nodes = []
    for name in dict.fromkeys(graph.upstream + graph.downstream):
        kind, layer, head = parse_node(name)
        params = node_parameters(model, layout, name) if model is not None else []
        nodes.append({"name": name, "kind": kind, "layer": layer, "head": head, "score": scores.get(name, 0.0),
                      "params": params, "in_circuit": name in in_circuit})
    edges = sorted(graph.edges(), key=lambda e: -abs(e[2]))
    edges = edges[:max_links] if max_links else edges
    links = [{"source": u, "target": v, "weight": s} for u, v, s in edges]
    return {"metadata": portable_paths(graph.metadata), "upstream": graph.upstream, "downstream": graph.downstream,
            "nodes": nodes, "links": links, "circuit": circuit.to_dict() if circuit else None}


def save_graph(graph: AttributionGraph, run_dir: Path, stage: str, *, model: Any = None,
               circuit: Circuit | None = None, max_links: int | None = None) -> tuple[Path, Path]:
    """Write attribution/<stage>.json and attribution/<stage>.safetensors atomically, plus the circuit-tracer
    export attribution/<stage>.circuit-tracer.json (the circuit's edges when given); returns the first two."""
    if stage not in run_layout.ATTRIBUTION_STAGES:
        accepted = ", ".join(run_layout.ATTRIBUTION_STAGES)
        raise ValueError(f"unknown attribution stage {stage!r}: accepted are {accepted}")
    json_path, tensor_path = run_layout.attribution_json(run_dir, stage), run_layout.attribution_tensors(run_dir, stage)
    tensors = {"scores": graph.scores, "valid": graph.valid, "metric_clean": graph.metric_clean,
               "metric_corrupt": graph.metric_corrupt}
    if graph.per_example is not None:
        tensors["per_example"] = graph.per_example
    write_safetensors_atomic(tensor_path, tensors, {"stage": stage, "n_upstream": str(len(graph.upstream)),
                                                    "n_downstream": str(len(graph.downstream))})
    write_json_atomic(json_path, graph_to_json(graph, model=model, circuit=circuit, max_links=max_links),
                      add_stamp=True)
    write_json_atomic(run_layout.attribution_tracer_json(run_dir, stage),
                      to_circuit_tracer(graph, circuit=circuit, slug=f"{Path(run_dir).name}-{stage}"))
    return json_path, tensor_path


def load_graph(run_dir: Path, stage: str) -> AttributionGraph:
    """Read a graph saved by `save_graph` (node names from the JSON, scores from the safetensors; a --from-run
    child's "before" graph is its parent's)."""
    meta = read_json(artifact(run_dir, run_layout.attribution_json(run_dir, stage)))
    tensors = read_safetensors(artifact(run_dir, run_layout.attribution_tensors(run_dir, stage)))
    scores = tensors["scores"]
    if tuple(scores.shape) != (len(meta["upstream"]), len(meta["downstream"])):
        raise ValueError(f"{run_layout.attribution_tensors(run_dir, stage)}: scores shape {tuple(scores.shape)} does "
                         "not match the node lists of its JSON")
    return AttributionGraph(meta["upstream"], meta["downstream"], scores, tensors["valid"].bool(),
                            tensors["metric_clean"], tensors["metric_corrupt"], tensors.get("per_example"),
                            meta["metadata"])


def save_circuit(circuit: Circuit, model: Any, run_dir: Path) -> Path:
    """Write circuit.json: the circuit, and its parameter masks per node (not per weight): ``node_slices``
    {node: [[param, dim, start, stop], ...]}, ``node_neurons`` {MLP node: {"neurons": [i, ...], "axes":
    [[param, dim], ...]}} for MLPs owned at the neuron grain, and ``parameter_shapes`` {param: logical shape}: a few
    bytes per node (plus a few per kept neuron) instead of the 1 B per weight of full-shape masks."""
    masks = circuit_parameter_masks(model, circuit)
    owned = sum(int(m.sum()) for m in masks.values())
    total = sum(p.numel() for p in model.parameters())
    data = {**circuit.to_dict(), "owned_parameters": owned, "owned_fraction": owned / max(total, 1),
            "masked_parameters": sorted(masks), "parameter_shapes": {n: list(m.shape) for n, m in masks.items()},
            "node_slices": node_slices(model, circuit.nodes, masks, circuit.neurons),
            "node_neurons": node_neurons(model, circuit.neurons, masks)}
    json_path = Path(run_dir) / run_layout.CIRCUIT
    write_json_atomic(json_path, data, add_stamp=True)
    return json_path


def node_slices(model: Any, nodes: list[str], masks: dict[str, torch.Tensor],
                neurons: dict[str, list[int]] | None = None) -> dict[str, list[list]]:
    """{node: [[param, dim, start, stop], ...]}: the slices of each parameter a node owns (mansu.models.components);
    an MLP owns its parameters whole (dim 0, 0, rows), unless it is in `neurons` (then `node_neurons` holds it)."""
    layout = model_layout(model)
    out: dict[str, list[list]] = {}
    for node in nodes:
        kind, layer, head = parse_node(node)
        if node in (neurons or {}):
            out[node] = []
        elif kind == "head":
            out[node] = [[key.split("#")[0], dim, sl.start, sl.stop]
                         for key, (dim, sl) in head_parameter_slices(layout, layer, head).items()
                         if key.split("#")[0] in masks]
        elif kind == "mlp":
            out[node] = [[name, 0, 0, int(masks[name].shape[0])] for name in node_parameters(model, layout, node)
                         if name in masks]
    return out


def node_neurons(model: Any, neurons: dict[str, list[int]], masks: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{MLP node: {"neurons": kept hidden neurons, "axes": [[param, dim], ...]}}: what each neuron-grain MLP owns."""
    layout = model_layout(model)
    return {node: {"neurons": [int(i) for i in kept],
                   "axes": [[name, dim] for name, dim in mlp_neuron_axes(layout, parse_node(node)[1]).items()
                            if name in masks]}
            for node, kept in neurons.items()}


def masks_from_slices(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full-shape bool masks (1 B per weight, built on load) from circuit.json's ``node_slices`` and ``node_neurons``
    (absent in runs made before the neuron grain: their MLPs are owned whole by their slices)."""
    shapes = data.get("parameter_shapes", {})
    masks = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
    for slices in data.get("node_slices", {}).values():
        for name, dim, start, stop in slices:
            masks[name].narrow(dim, start, stop - start).fill_(True)
    for owned in data.get("node_neurons", {}).values():
        kept = torch.tensor(owned["neurons"], dtype=torch.long)
        for name, dim in owned["axes"]:
            masks[name].index_fill_(dim, kept, True)
    return masks


def load_circuit(run_dir: Path) -> tuple[Circuit, dict[str, torch.Tensor]]:
    """The circuit and its parameter masks saved by `save_circuit` (a --from-run child's are its parent's; runs
    made before per-node masks read circuit_masks.safetensors)."""
    data = read_json(artifact(run_dir, run_layout.CIRCUIT))
    legacy = artifact(run_dir, run_layout.CIRCUIT_MASKS)
    if "node_slices" not in data and legacy.is_file():
        masks = {k: v.bool() for k, v in read_safetensors(legacy).items()}
    else:
        masks = masks_from_slices(data)
    return Circuit.from_dict(data), masks


def _tracer_node(name: str, n_layers: int, n_heads: int, influence: float) -> dict[str, Any]:
    kind, layer, head = parse_node(name)
    if kind == "input":
        node_id, layer_s, feature, ftype, js = "E_0_0", "E", 0, "embedding", "E_0-0"
    elif kind == "logits":
        layer_s = str(n_layers + 1)
        node_id, feature, ftype, js = f"{layer_s}_0_0", 0, "logit", "L_0-0"
    else:
        index = head if kind == "head" else n_heads
        node_id, layer_s, feature, js = f"{layer}_{index}_0", str(layer), index, f"{layer}_{index}-0"
        ftype = "attention head" if kind == "head" else "mlp"
    return {"node_id": node_id, "feature": feature, "layer": layer_s, "ctx_idx": 0, "feature_type": ftype,
            "token_prob": 0.0, "is_target_logit": kind == "logits", "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js, "clerp": name, "influence": influence, "activation": None}


def to_circuit_tracer(graph: AttributionGraph, *, circuit: Circuit | None = None, slug: str = "mansu-graph",
                      prompt: str = "", node_threshold: float | None = None) -> dict[str, Any]:
    """The graph (or only the circuit's edges) in circuit-tracer's graph JSON shape."""
    n_layers, n_heads = int(graph.metadata.get("n_layers", 0)), int(graph.metadata.get("n_heads", 0))
    scores = node_scores(graph)
    keep = set(circuit.edges) if circuit else None
    edges = [(u, v, s) for u, v, s in graph.edges() if keep is None or (u, v) in keep]
    names = list(dict.fromkeys([u for u, _, _ in edges] + [v for _, v, _ in edges]))
    nodes = [_tracer_node(n, n_layers, n_heads, scores.get(n, 0.0)) for n in names]
    ids = {n: node["node_id"] for n, node in zip(names, nodes)}
    scan = portable_path(str(graph.metadata.get("model", "")))  # exported: no machine paths
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [],
                         "prompt_tokens": [], "prompt": prompt, "node_threshold": node_threshold, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": [{"source": ids[u], "target": ids[v], "weight": -s} for u, v, s in edges]}


def save_cad(results: dict[str, Any], run_dir: Path) -> Path:
    """Write cad.json: {stage: CADResult} (e.g. {"after_fp": ..., "after_nf4": ...}) with formula and intervals."""
    path = Path(run_dir) / run_layout.CAD
    write_json_atomic(path, {stage: r.to_dict() for stage, r in results.items()}, add_stamp=True)
    return path


def load_cad(run_dir: Path) -> dict[str, dict[str, Any]]:
    """cad.json as plain dicts keyed by stage (the provenance stamp dropped)."""
    data = read_json(Path(run_dir) / run_layout.CAD)
    return {k: v for k, v in data.items() if k != "_stamp"}
