"""The neuron grain of MLP ownership: which hidden neurons of a circuit's MLP node the unlearning may update.

A circuit node ``m{L}`` would otherwise own its whole MLP (on the 2-layer demo two MLPs are 75% of the quantizable
weights, so any circuit holding both owns >= 75% and localisation cannot matter). Here each circuit MLP owns only
its top neurons, ranked by attribution patching at its hidden activations a (the input of down_proj; GPT-2: of
mlp.c_proj), on the same records, metric and corruption as the circuit's EAP-IG (`mansu.attribution.eap`):

    score_i = mean over examples of  sum_pos (a_i(corrupted) - a_i(clean)) . (1/m) sum_{k=1..m} dM/da_i |_{e_k}

with e_k the same midpoint interpolation of the input stream as EAP-IG (so a score, like an edge's, estimates
M(neuron corrupted) - M(clean), and m = 1 is plain attribution patching at the midpoint).

Selection (`keep_neurons`, the one rule): per circuit MLP node, the fewest top-|score| neurons whose |score| sum
reaches `mass` of the node's total |score|, at most ``ceil(max_fraction * width)`` and at least one; mass 1.0 keeps
the whole MLP (no scoring), as before the neuron grain. The owned rows/columns per neuron are
`mansu.models.components.mlp_neuron_axes`.

Memory, per batch of b examples of s positions on the model's device: for each circuit MLP (width I) the clean and
corrupted hidden activations, 8 b s I bytes (float32), and one IG step's gradient, 4 b s I; the scores are 4 B per
neuron, the kept lists a few bytes per kept neuron in circuit.json; the masks built from them
(`circuit_parameter_masks`) are 1 B per weight of the parameters the circuit touches, as for heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mansu.attribution.circuit import Circuit, circuit_parameter_masks
from mansu.attribution.data import Metric, metric_values
from mansu.attribution.eap import corrupted_pass, prepare
from mansu.attribution.engine import capture
from mansu.models.components import mlp_hidden_module, model_layout, parse_node
from mansu.models.hooks import NodeCallbacks, differentiable_4bit, hooks, node_hooks
from mansu.unlearn.params import quantizable_names

MAX_FRACTION = 0.25   # a node keeps at most this fraction of its neurons (the demo's <= 30% ownership target)


def check_mass(mass: float) -> float:
    """`mass` if in (0, 1]; ValueError in one line otherwise."""
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
        raise ValueError(f"mlp neuron mass must be in (0, 1] (1: the whole MLP), got {mass!r}")
    return float(mass)


def keep_neurons(scores: torch.Tensor, mass: float, max_fraction: float = MAX_FRACTION) -> list[int]:
    """The fewest top-|score| neurons covering `mass` of sum |score|, capped at ceil(max_fraction * width), >= 1;
    sorted by index. mass 1.0: every neuron."""
    width = scores.numel()
    if check_mass(mass) >= 1.0:
        return list(range(width))
    order = torch.argsort(scores.abs().double(), descending=True, stable=True)
    cumulative = torch.cumsum(scores.abs().double()[order], 0)
    needed = int(torch.searchsorted(cumulative, mass * cumulative[-1]).item()) + 1
    count = max(1, min(needed, math.ceil(max_fraction * width), width))
    return sorted(order[:count].tolist())


def mlp_layers(circuit: Circuit) -> list[int]:
    return [parse_node(n)[1] for n in circuit.nodes if parse_node(n)[0] == "mlp"]


def neuron_scores(model: Any, tokenizer: Any, records: Sequence[Any], layers: Sequence[int], *, metric: Metric,
                  corruption: str, ig_steps: int = 5, batch_size: int = 16,
                  max_records: int | None = None) -> dict[int, torch.Tensor]:
    """{layer: [intermediate] float32}: score_i of every hidden neuron of the MLPs of `layers` (module docstring)."""
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    with differentiable_4bit(model):
        prep = prepare(model, tokenizer, records, metric=metric, corruption=corruption, batch_size=batch_size,
                       max_records=max_records)
        sums: dict[int, torch.Tensor] = {}
        for batch in prep.batches:
            for layer, score in _batch_scores(model, prep.space, batch, list(layers), metric, corruption,
                                              ig_steps).items():
                sums[layer] = sums.get(layer, 0) + score
    n = sum(len(b.indices) for b in prep.batches)
    return {layer: s / n for layer, s in sums.items()}


def _recording(model: Any, layers: list[int], into: dict[int, torch.Tensor]) -> list:
    """Pre-hooks storing each layer's hidden activations (float32) into `into`."""
    layout = model_layout(model)

    def store(layer: int):
        def pre(module, args):
            into[layer] = args[0].detach().float()
        return pre
    return [(mlp_hidden_module(model, layout, layer), "pre", store(layer), False) for layer in layers]


def _batch_scores(model: Any, space: Any, batch: Any, layers: list[int], metric: Metric, corruption: str,
                  steps: int) -> dict[int, torch.Tensor]:
    clean: dict[int, torch.Tensor] = {}
    corrupt: dict[int, torch.Tensor] = {}
    with hooks(_recording(model, layers, clean)):
        run = capture(model, space, batch, batch.clean, metric, store=False)
    with hooks(_recording(model, layers, corrupt)):
        _, e_corrupt = corrupted_pass(model, space, batch, metric, corruption, run.input, store=False)
    mask = batch.mask[..., None].float()
    diff = {l: (corrupt[l] - clean[l]) * mask.to(clean[l].device) for l in layers}    # padded positions: nothing
    del clean, corrupt
    scores = {l: torch.zeros(diff[l].shape[-1], device=diff[l].device) for l in layers}
    for k in range(1, steps + 1):
        e_k = e_corrupt + (k - 0.5) / steps * (run.input - e_corrupt)
        grads = _hidden_gradients(model, space, batch, layers, metric, e_k)
        for l in layers:
            scores[l] += (diff[l] * grads[l].to(diff[l].device)).sum((0, 1)) / steps
    return {l: s.cpu() for l, s in scores.items()}


def _hidden_gradients(model: Any, space: Any, batch: Any, layers: list[int], metric: Metric,
                      e_k: torch.Tensor) -> dict[int, torch.Tensor]:
    """d(sum_b metric_b) / d(hidden activations) [b, s, I] of each layer, with the input stream replaced by e_k."""
    layout = model_layout(model)
    probes: dict[int, torch.Tensor] = {}

    def probe(layer: int):
        def pre(module, args):
            probes[layer] = torch.zeros_like(args[0], requires_grad=True)
            return (args[0] + probes[layer], *args[1:])
        return pre
    regs = [(mlp_hidden_module(model, layout, l), "pre", probe(l), False) for l in layers]
    with torch.enable_grad(), hooks(regs), node_hooks(model, layout, NodeCallbacks(input_override=e_k)):
        value = metric_values(model(input_ids=batch.clean, attention_mask=batch.mask).logits, batch, metric).sum()
        grads = torch.autograd.grad(value, [probes[l] for l in layers])
    return {l: g.float() for l, g in zip(layers, grads)}


def quantizable_fraction(model: Any, masks: dict[str, torch.Tensor]) -> float:
    """Fraction of the quantizable weights the masks own."""
    params = dict(model.named_parameters())
    names = quantizable_names(model)
    total = sum(masks[n].numel() if n in masks else params[n].numel() for n in names)
    return sum(int(masks[n].sum()) for n in names if n in masks) / max(total, 1)


def with_neuron_grain(model: Any, tokenizer: Any, records: Sequence[Any], circuit: Circuit, *, mass: float,
                      metric: Metric, corruption: str, ig_steps: int = 5, batch_size: int = 16,
                      max_fraction: float = MAX_FRACTION) -> Circuit:
    """`circuit` with its MLP nodes' kept neurons (mass < 1) and, in its metadata["neuron_grain"], the mass, the
    kept counts and the circuit's fraction of the quantizable weights with whole MLPs and with the neuron grain."""
    check_mass(mass)
    whole = quantizable_fraction(model, circuit_parameter_masks(model, Circuit(circuit.edges)))
    layers = mlp_layers(circuit)
    if mass < 1.0 and layers:
        scores = neuron_scores(model, tokenizer, records, layers, metric=metric, corruption=corruption,
                               ig_steps=ig_steps, batch_size=batch_size)
        circuit.neurons = {f"m{l}": keep_neurons(scores[l], mass, max_fraction) for l in layers}
    else:
        circuit.neurons = {}
    circuit.metadata["neuron_grain"] = {
        "mass": mass, "max_fraction": max_fraction, "kept": {n: len(k) for n, k in circuit.neurons.items()},
        "quantizable_fraction_whole_mlp": whole,
        "quantizable_fraction": quantizable_fraction(model, circuit_parameter_masks(model, circuit))}
    return circuit
