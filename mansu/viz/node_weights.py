"""Weights under the circuit: what unlearning did to the weights each graph node owns.

Per node (a head a{L}.h{H} or an MLP m{L}; `input` and `logits` own nothing):

    owned           elements of the parameters the node owns (mansu.models.components: a head's q rows, its kv
                    head's k/v rows -- shared by the heads of a GQA group, so counted for each -- and its o_proj
                    columns; an MLP its whole module, or at the neuron grain only its kept neurons' rows/columns),
                    as the circuit masks define them
    touched         of those, the coordinates the run wrote (model_update.safetensors)
    updated         touched coordinates whose value differs from the aligned base (delta != 0)
    codes changed   per quantizer, owned elements of quantized weights whose code differs between the aligned base
                    and the unlearned model, updated or not (a moved block absmax re-codes its neighbours), each
                    quantizer as registered (nf4 at blocksize 64); None where the quantizer takes none of the node's
                    weights (int4-g128 needs rows of a multiple of 128)
    |delta| / bin   the updated weights' |delta| over the NF4 bin width of the base at the run's blocksize
                    (mansu.quant.geometry, as the survival analysis measures it),
                    histogram on survival's log bins (mansu.quant.survival.histogram_edges) and median

The base is rebuilt as the run built it (its weights, aligned as its base_alignment says); the unlearned weights are
that base with the stored values written.  Only the touched parameters are read: from the base folder's safetensors
onto a meta-device skeleton of the model, each aligned alone as the whole-model alignment would (a hub id, or a
checkpoint whose tensor names differ, loads and aligns the whole base instead).  Then one parameter at a time: its
base and updated copies (2 x its fp32 bytes), an fp64 delta (8 B per element), two code tensors per quantizer (1 B per
element each) and an fp32 bin width (4 B per element).  The result holds a few hundred bytes per node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mansu.runs import layout as run_layout

STAGES = ("before", "after_fp", "after_nf4")


@dataclass
class NodeWeights:
    """What unlearning did to one node's weights (see the module docstring)."""

    node: str
    owned: int = 0
    touched: int = 0
    updated: int = 0
    codes_changed: dict[str, int] = field(default_factory=dict)
    coverage: dict[str, int] = field(default_factory=dict)    # owned elements of weights each quantizer takes
    ratio_counts: list[int] = field(default_factory=list)     # [under, the log bins..., over] (survival's layout)
    median_ratio: float | None = None

    def codes_changed_pct(self, quantizer: str) -> float | None:
        """Percent of the owned weights `quantizer` takes whose code changed (None: it takes none of them)."""
        return _pct(self.codes_changed.get(quantizer, 0), self.coverage.get(quantizer, 0))

    def row(self) -> dict[str, Any]:
        """One table row: counts, and percentages of the owned weights."""
        out: dict[str, Any] = {"node": self.node, "owned weights": self.owned, "touched": self.touched,
                               "touched %": _pct(self.touched, self.owned),
                               "median |delta| / NF4 bin": self.median_ratio}
        for name in self.codes_changed:
            covered = self.coverage.get(name, 0)
            out[f"{name} codes changed"] = self.codes_changed[name] if covered else None
            out[f"{name} codes changed %"] = self.codes_changed_pct(name)
        return out


@dataclass(frozen=True)
class NodeWeightReport:
    """Per-node weights of one run, with the histogram edges and the base it was measured against."""

    nodes: dict[str, NodeWeights]
    hist_edges: list[float]
    quantizers: tuple[str, ...]
    base_alignment: str
    n_touched: int

    def rows(self, *, touched_only: bool = False) -> list[dict[str, Any]]:
        return [w.row() for w in self.nodes.values() if w.touched or not touched_only]

    def histogram_entry(self, node: str) -> dict[str, Any]:
        """{"histogram": {"edges", "counts"}} for mansu.viz.survival.histogram_of."""
        return {"histogram": {"edges": self.hist_edges, "counts": self.nodes[node].ratio_counts}}


def _pct(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def node_weight_report(run: Path, *, nodes: Sequence[str] | None = None) -> NodeWeightReport:
    """The per-node report of `run` (every head and MLP of the model unless `nodes` names some).
    FileNotFoundError when the run stored no model update; ValueError for an unknown node name."""
    from mansu.unlearn.model_update import read_model_update

    run = Path(run)
    values, meta = read_model_update(run / run_layout.MODEL_UPDATE)  # before the base loads
    neurons = _circuit_neurons(run)
    alignment, blocksize = meta.get("base_alignment", "natural"), int(meta.get("blocksize", 64))
    lean = _lean_base(_base_path(run), meta.get("dtype", "fp32"), alignment, blocksize, list(values))
    model, base = lean if lean is not None else (_aligned_base(run, meta), None)
    return report_for_model(model, values, base=base, alignment=alignment, blocksize=blocksize, nodes=nodes,
                            neurons=neurons)


def _circuit_neurons(run: Path) -> dict[str, list[int]]:
    """The kept neurons of the run's circuit MLPs ({} without a circuit or at whole-MLP ownership)."""
    from mansu.io import read_json
    from mansu.runs.store import artifact

    try:
        return read_json(artifact(run, run_layout.CIRCUIT)).get("neurons") or {}
    except FileNotFoundError:
        return {}


def _base_path(run: Path) -> str:
    """The base model's folder or hub id, as the run resolved it ('demo': the cached demo model)."""
    from mansu.pipeline import resolve_inputs
    from mansu.runs.store import read_config
    from mansu.spec import RunSpec

    return resolve_inputs(RunSpec.from_dict(read_config(run)["spec"]), build_demo=False).model


def _lean_base(model_path: str, dtype: str, alignment: str, blocksize: int,
               touched: list[str]) -> tuple[Any, dict[str, Any]] | None:
    """(the model's skeleton on the meta device, {touched parameter: its aligned base value}), reading only the
    touched weights from the folder's safetensors (an 8B model's report then holds a few tensors, not the model);
    None where that is not possible (a hub id, a checkpoint whose tensor names differ): load the whole base then."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from mansu.models.loading import torch_dtype

    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            where.update(dict.fromkeys(fh.keys(), file))
    if any(name not in where for name in touched):
        return None
    base = {}
    for name in touched:
        with safe_open(str(where[name]), framework="pt") as fh:
            base[name] = fh.get_tensor(name).to(torch_dtype(dtype))
    return skeleton, _align_tensors(skeleton, base, alignment, blocksize)


def _align_tensors(skeleton: Any, base: dict[str, Any], alignment: str, blocksize: int) -> dict[str, Any]:
    """`base` aligned as mansu.unlearn.nf4_model.round_trip_in_place aligns a whole model: each weight's groups
    seeded by its position among the weights the quantizer takes."""
    from mansu.quant.alignment import ALIGNMENT_SEED, aligned_view, fits, parse_alignment
    from mansu.quant.registry import get_quantizer
    from mansu.quant.targets import quant_layout, quantizable_parameter_names

    parsed = parse_alignment(alignment)
    if parsed.is_natural:
        return base
    qz, layout = get_quantizer(parsed.quantizer), quant_layout(skeleton)
    params = dict(skeleton.named_parameters())
    aligned = [n for n in quantizable_parameter_names(skeleton) if fits(qz, layout.view(n, params[n]))]
    out = dict(base)
    for i, name in enumerate(aligned):
        if name in base:
            view = aligned_view(qz, layout.view(name, base[name]), parsed.fraction, seed=ALIGNMENT_SEED + i,
                                blocksize=blocksize, name=name)
            out[name] = layout.unview(name, view).to(base[name].dtype)
    return out


def _aligned_base(run: Path, meta: dict[str, str]) -> Any:
    """The run's whole base model on the CPU, aligned as the run aligned it (as mansu export rebuilds it)."""
    from mansu.models.loading import load_model
    from mansu.runs.store import read_config
    from mansu.spec import RunSpec
    from mansu.unlearn.nf4_model import align_base

    spec = RunSpec.from_dict(read_config(run)["spec"])
    lm = load_model(_base_path(run), dtype=meta.get("dtype", spec.dtype), device="cpu", tokenizer=spec.tokenizer)
    align_base(lm.model, meta.get("base_alignment", spec.base_alignment), int(meta.get("blocksize", 64)))
    return lm.model


def report_for_model(model: Any, values: dict[str, tuple[Any, Any]], *, base: dict[str, Any] | None = None,
                     alignment: str = "?", blocksize: int = 64, nodes: Sequence[str] | None = None,
                     neurons: dict[str, list[int]] | None = None) -> NodeWeightReport:
    """The per-node report of `values` ({param: (flat indices or None, new values)}, read_model_update's) written
    over the aligned base: `base` {param: value} for every written parameter when given (then `model` may be a
    meta-device skeleton: only its names and shapes are read), else `model`'s own weights (not modified).
    `neurons` {MLP node: kept hidden neurons}: those MLPs own only their neurons' rows/columns."""
    import torch

    from mansu.models.components import model_layout
    from mansu.quant.registry import QUANTIZERS
    from mansu.quant.survival import histogram_edges
    from mansu.quant.targets import quant_layout, quantizable_parameter_names

    names = list(nodes) if nodes is not None else [n for n in model_layout(model).upstream_nodes() if n != "input"]
    owners = ownership(model, names, neurons)
    quantized, qlayout = set(quantizable_parameter_names(model)), quant_layout(model)
    params = dict(model.named_parameters())
    out = {n: NodeWeights(n, codes_changed=dict.fromkeys(QUANTIZERS, 0), coverage=dict.fromkeys(QUANTIZERS, 0))
           for n in names}
    ratios: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for pname, slices in owners.items():
        weight = (base or {}).get(pname, params[pname])
        effect = parameter_effect(pname, weight.detach().float(), values.get(pname),
                                  qlayout if pname in quantized else None, QUANTIZERS, blocksize)
        for node, dim, part in slices:
            _accumulate(out[node], ratios[node], effect, dim, part)
    for node, parts in ratios.items():
        _finish(out[node], torch.cat(parts) if parts else torch.zeros(0))
    n_touched = sum(int(v.numel()) for _, v in values.values())
    return NodeWeightReport(out, histogram_edges(), tuple(QUANTIZERS), alignment, n_touched)


Part = Any  # a slice (rows/columns start:stop) or an int64 tensor of indices along a dim


def ownership(model: Any, nodes: Iterable[str],
              neurons: dict[str, list[int]] | None = None) -> dict[str, list[tuple[str, int, Part]]]:
    """{parameter: [(node, dim, part), ...]}: what each node owns, per parameter (the circuit masks' rule,
    mansu.models.components): a head its slices, an MLP its parameters whole or, when `neurons` lists its kept
    hidden neurons, their entries along each parameter's neuron axis (the output bias is then nobody's)."""
    import torch

    from mansu.models.components import (
        head_parameter_slices,
        mlp_neuron_axes,
        model_layout,
        node_parameters,
        parse_node,
    )

    layout = model_layout(model)
    params = dict(model.named_parameters())
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for node in nodes:
        kind, layer, head = parse_node(node)  # ValueError naming the accepted forms
        if kind == "head":
            for key, (dim, sl) in head_parameter_slices(layout, layer, head).items():
                if key.split("#")[0] in params:
                    out.setdefault(key.split("#")[0], []).append((node, dim, sl))
        elif kind == "mlp" and node in (neurons or {}):
            kept = torch.tensor(sorted(neurons[node]), dtype=torch.long)
            for pname, dim in mlp_neuron_axes(layout, layer).items():
                if pname in params:
                    out.setdefault(pname, []).append((node, dim, kept))
        elif kind == "mlp":
            for pname in node_parameters(model, layout, node):
                out.setdefault(pname, []).append((node, 0, slice(0, int(params[pname].shape[0]))))
    return out


@dataclass(frozen=True)
class ParameterEffect:
    """One parameter's per-element change, in its own shape (touched and delta None: the run never wrote it)."""

    shape: tuple[int, ...]
    touched: Any | None                # bool
    delta: Any | None                  # fp64 new - base (exact)
    bin_width: Any | None              # fp32 NF4 bin width of the base (quantized weights only)
    changed: dict[str, Any]            # per quantizer that takes this weight: bool code changed (None: not written)


def parameter_effect(name: str, base: Any, stored: tuple[Any, Any] | None, qlayout: Any | None,
                     quantizers: dict[str, Any], blocksize: int = 64) -> ParameterEffect:
    """The change `stored` (flat indices or None, new values) makes to `base`; codes on every quantizer that takes
    the weight (`qlayout` None: not a quantized weight). Only written parameters are quantized."""
    import torch

    from mansu.quant.alignment import fits

    shape = tuple(base.shape)
    view_shape = shape[::-1] if qlayout is not None and qlayout.is_transposed(name) else shape
    takes = [q for q, qz in quantizers.items() if qlayout is not None and fits(qz, torch.empty(view_shape,
                                                                                                device="meta"))]
    if stored is None:
        return ParameterEffect(shape, None, None, None, dict.fromkeys(takes))
    idx, vals = stored
    new, touched = base.clone().reshape(-1), torch.zeros(base.numel(), dtype=torch.bool)
    if idx is None:
        new, touched[:] = vals.float().reshape(-1).clone(), True
    else:
        new[idx], touched[idx] = vals.float(), True
    new = new.reshape(shape)
    changed, width = {}, None
    if qlayout is not None:
        v0, v1 = qlayout.view(name, base), qlayout.view(name, new)
        for q in takes:
            qz = quantizers[q]
            changed[q] = qlayout.unview(name, qz.quantize(v0, name=name).codes != qz.quantize(v1, name=name).codes)
        width = qlayout.unview(name, nf4_bin_width(v0, blocksize).reshape(v0.shape))
    # float64: the difference of two fp32 weights is exact (as in the survival analysis)
    return ParameterEffect(shape, touched.reshape(shape), new.double() - base.double(), width, changed)


def nf4_bin_width(view: Any, blocksize: int) -> Any:
    """fp32 [n] NF4 bin width of each element of a quantizer's view, on the survival analysis' arithmetic
    (cell width in scaled units x block absmax), so a ratio here equals survival's bit for bit."""
    import torch

    from mansu.quant.nf4 import block_absmax, cell_widths_scaled, codes_from_scaled, mul_by_block, scale_by_block

    x = view.reshape(-1)
    absmax = block_absmax(x, blocksize)
    width = torch.index_select(cell_widths_scaled(), 0, codes_from_scaled(scale_by_block(x, absmax, blocksize)))
    mul_by_block(width, absmax, blocksize)
    return width


def _take(t: Any, dim: int, part: Part) -> Any:
    """The owned part of t along dim: a narrow view for a slice, an index_select for listed indices."""
    if isinstance(part, slice):
        return t.narrow(dim, part.start, part.stop - part.start)
    return t.index_select(dim, part)


def _accumulate(acc: NodeWeights, ratios: list[Any], effect: ParameterEffect, dim: int, part: Part) -> None:
    """Add one owned part (rows or columns along `dim`: a slice or listed indices) of one parameter to a node's
    counts."""
    width_along = part.stop - part.start if isinstance(part, slice) else int(part.numel())
    n = int(np.prod(effect.shape)) // effect.shape[dim] * width_along
    acc.owned += n
    for q, mask in effect.changed.items():
        acc.coverage[q] += n
        if mask is not None:
            acc.codes_changed[q] += int(_take(mask, dim, part).sum())
    if effect.touched is None:
        return
    acc.touched += int(_take(effect.touched, dim, part).sum())
    delta = _take(effect.delta, dim, part)
    moved = delta != 0
    acc.updated += int(moved.sum())
    if effect.bin_width is not None:
        width = _take(effect.bin_width, dim, part)
        ratios.append((delta[moved].abs() / width[moved]).float().reshape(-1))


def _finish(acc: NodeWeights, ratios: Any) -> None:
    from mansu.quant.survival import _hist

    acc.ratio_counts = _hist(ratios.float()).tolist() if ratios.numel() else []  # fp32, as survival bins them
    acc.median_ratio = float(ratios.median()) if ratios.numel() else None


def node_edge_scores(graphs: dict[str, Any], node: str, *, limit: int = 30) -> list[dict[str, Any]]:
    """The edges into and out of `node` with their score at each stage present in `graphs` ({stage: GraphData}),
    strongest before first (a stage's missing edge reads None); [] when `node` is in no graph."""
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for stage, graph in graphs.items():
        if graph is None or node not in graph.index():
            continue
        at = graph.index()[node]
        for i in np.flatnonzero((graph.src == at) | (graph.dst == at)):
            edge = (graph.names[graph.src[i]], graph.names[graph.dst[i]])
            scores.setdefault(edge, {})[stage] = float(graph.weight[i])
    first = next((s for s in STAGES if s in graphs and graphs[s] is not None), None)
    order = sorted(scores, key=lambda e: -abs(scores[e].get(first, 0.0)))[:limit]
    return [{"edge": f"{u} → {v}", **{s: scores[(u, v)].get(s) for s in graphs if graphs[s] is not None}}
            for u, v in order]
