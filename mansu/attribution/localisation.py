"""Localisation at a fixed budget (issue 13, item 5): the masks MANSU's update may be restricted to, every one of
the same size B = the EAP-IG circuit's quantizable coordinates, so that only *where* the update goes differs.

    circuit   the EAP-IG circuit (mansu.attribution.circuit.circuit_parameter_masks): what a normal run uses
    random    B coordinates drawn uniformly without replacement from all quantizable weights (seeded by the run's
              seed): the null model of localisation
    fact_mlp  the MLPs where the facts are looked up (Meng et al. 2022's causal tracing, the localisation Guo et al.,
              ICML'25 found more robust than output tracing).  Rule, fixed before any result was seen:
                1. corrupt the subject (the run's attribution prompts and corruption: subject swap, or mean/zero
                   ablation of the subject tokens), restore layer L's clean MLP output at the subject's last token,
                   IE_L = mean over prompts of m(corrupted, m_L restored) - m(corrupted) (m: the attribution metric);
                2. layers in descending IE (ties: the lower layer); take each layer's whole MLP while it fits in B;
                3. in the first layer that does not fit, its hidden neurons (the neuron grain's rows/columns,
                   mansu.models.components.mlp_neuron_axes) in descending sum of |forget gradient| over their
                   weights, whole neurons while they fit, then the remainder from the next neuron by |gradient|
    saliency  the top-B coordinates of |g_i| / (F_i + damping * mean F) over all quantizable weights (SalUn /
              SSD-style gradient saliency): g the forget-NLL gradient at the base (NPO's gradient at the reference is
              the same direction), F the retain diagonal Fisher (mansu.unlearn.retain_stats.fisher_only on
              n_fisher retain examples), damping the run's fisher_damping

Masks are bool tensors shaped like their parameter (1 B per weight of every parameter they name), built through a
flat bool vector (1 B per coordinate, transient).  Building random keeps one int64 permutation of the quantizable
coordinates (8 B per coordinate) up to RANDOM_DIRECT (2^24) of them, beyond that one tensor's at a time (8 B per
weight of the largest tensor); fact_mlp and saliency the forget gradient over the quantizable weights (fp32, 4 B
per coordinate), saliency also the Fisher (4 B), the score written over both, and top_indices' radix selection
(no per-coordinate buffer past 2^24): transient, freed before the unlearning starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from mansu.attribution.data import Batch, Prompt, build_examples, collate, metric_values
from mansu.devices import input_device
from mansu.models.components import decoder_layers, layer_modules, mlp_neuron_axes, model_layout
from mansu.models.hooks import hooks
from mansu.unlearn.data import TokenBatch
from mansu.unlearn.objectives import nll_loss
from mansu.unlearn.params import ParamIndex, full_masks, index_from_masks, quantizable_names

log = logging.getLogger(__name__)

Localisation = Literal["circuit", "random", "fact_mlp", "saliency"]
LOCALISATIONS: tuple[str, ...] = get_args(Localisation)
GRAD_CHUNK = 32  # forget sequences per backward pass of the forget gradient
RANDOM_DIRECT = 2**24  # random masks: one global permutation up to this many coordinates, per tensor beyond


@dataclass(frozen=True)
class Localised:
    """A localisation's masks and how they were chosen (metrics.json "localisation")."""
    masks: dict[str, torch.Tensor]
    info: dict[str, Any]


def check_localisation(name: str) -> str:
    if name not in LOCALISATIONS:
        raise ValueError(f"localisation {name!r} is not supported; accepted are {', '.join(LOCALISATIONS)}")
    return name


def budget(model: Any, masks: dict[str, torch.Tensor]) -> int:
    """Coordinates of `masks` the engine may move: those in quantizable weights (as Method.coordinates)."""
    quant = set(quantizable_names(model))
    return sum(int(m.sum()) for n, m in masks.items() if n in quant)


def _quant_index(model: Any) -> ParamIndex:
    return index_from_masks(full_masks(model), model)


def _masks_at(index: ParamIndex, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool masks (CPU) of the flat `positions` of `index` (an index over whole tensors)."""
    flat = torch.zeros(index.numel, dtype=torch.bool)
    flat[positions.cpu()] = True
    out = {}
    for i, (name, off) in enumerate(zip(index.names, index.offsets())):
        part = flat[off: off + index.size(i)]
        if bool(part.any()):
            out[name] = part.reshape(index.shapes[i]).clone()
    return out


def random_masks(model: Any, n: int, seed: int) -> dict[str, torch.Tensor]:
    """n coordinates drawn uniformly without replacement from the quantizable weights, seeded: one permutation of
    them all up to RANDOM_DIRECT coordinates (the demo), else tensor by tensor (`_random_per_tensor`)."""
    index = _quant_index(model)
    if index.numel > RANDOM_DIRECT:
        return _random_per_tensor(index, n, seed)
    gen = torch.Generator().manual_seed(seed)
    return _masks_at(index, torch.randperm(index.numel, generator=gen)[:n])


def _random_per_tensor(index: ParamIndex, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The same distribution as one global permutation without its 8 B per coordinate: how many of the n fall in
    each tensor is one multivariate hypergeometric draw, then a uniform subset of that size within each tensor
    (one tensor's permutation at a time: 8 B per weight of the largest tensor)."""
    import numpy as np

    sizes = [index.size(i) for i in range(len(index.names))]
    counts = np.random.default_rng(seed).multivariate_hypergeometric(sizes, n)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, count) in enumerate(zip(index.names, counts.tolist())):
        if count:
            mask = torch.zeros(sizes[i], dtype=torch.bool)
            mask[torch.randperm(sizes[i], generator=gen)[:count]] = True
            out[name] = mask.reshape(index.shapes[i])
    return out


def forget_gradient(model: Any, forget: TokenBatch, index: ParamIndex) -> torch.Tensor:
    """d mean-NLL(forget) / d theta over `index`, flat fp32 [n], GRAD_CHUNK sequences per backward pass."""
    from mansu.unlearn.retain_stats import masked_grad

    device = input_device(model)
    out = torch.zeros(index.numel, device=index.device)
    for lo in range(0, len(forget), GRAD_CHUNK):
        chunk = forget.select(list(range(lo, min(lo + GRAD_CHUNK, len(forget))))).to(device)
        masked_grad(model, nll_loss(model, chunk), index, out=out, alpha=len(chunk) / len(forget))
    return out


def saliency_score(grad: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
    """|g_i| / (F_i + damping * mean F) (a tiny floor keeps an all-zero Fisher finite), written into `grad` and
    `fisher` (no third [n] vector)."""
    return grad.abs_().div_(fisher.add_(damping * float(fisher.mean())).add_(1e-30))


def saliency_masks(model: Any, forget: TokenBatch, retain: TokenBatch, n: int, *, n_fisher: int, damping: float,
                   seed: int) -> dict[str, torch.Tensor]:
    """The top-n coordinates of `saliency_score` over the quantizable weights (ties: the lower flat position)."""
    from mansu.unlearn.methods.base import top_indices
    from mansu.unlearn.retain_stats import fisher_only

    index = _quant_index(model)
    grad = forget_gradient(model, forget, index)
    fisher = fisher_only(model, retain, index, n_fisher, seed=seed)
    return _masks_at(index, top_indices(saliency_score(grad, fisher, damping), n))


# ---------------------------------------------------------------- fact lookup: causal tracing, then the budget

def _corrupt_input(batch: Batch, corruption: str):
    """A pre-hook on layer 0 that mean- or zero-ablates the subject positions of the input stream."""
    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = batch.corrupt_mask[..., None].to(hidden.device)
        if corruption == "zero":
            fill = torch.zeros_like(hidden)
        else:
            real = batch.mask[..., None].to(hidden.dtype).to(hidden.device)
            fill = ((hidden * real).sum((0, 1)) / real.sum().clamp(min=1)).expand_as(hidden)
        hidden = torch.where(mask, fill, hidden)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
    return pre


@torch.no_grad()
def _traced_batch(model: Any, batch: Batch, metric: str, corruption: str, mlps: list, last: torch.Tensor):
    """(m clean [b], m corrupted [b], m corrupted with layer L's MLP output restored at `last` [L, b])."""
    run = lambda ids, extra=(): metric_values(  # noqa: E731
        _forward(model, ids, batch.mask, extra), batch, metric)
    clean_out: dict[int, torch.Tensor] = {}
    record = [(mlp, "forward", lambda m, a, out, i=i: clean_out.__setitem__(i, out.detach()), False)
              for i, mlp in enumerate(mlps)]
    m_clean = run(batch.clean, record)
    corrupt_ids = batch.corrupt if corruption == "counterfactual" else batch.clean
    ablate = [] if corruption == "counterfactual" else [
        (decoder_layers(model, model_layout(model))[0], "pre", _corrupt_input(batch, corruption), True)]
    m_corrupt = run(corrupt_ids, ablate)
    rows = torch.arange(batch.clean.shape[0], device=batch.clean.device)
    last = last.to(batch.clean.device)
    restored = []
    for i, mlp in enumerate(mlps):
        def restore(module, args, out, i=i):
            out = out.clone()
            out[rows, last] = clean_out[i][rows, last]
            return out
        restored.append(run(corrupt_ids, [*ablate, (mlp, "forward", restore, False)]))
    return m_clean, m_corrupt, torch.stack(restored)


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, registrations) -> torch.Tensor:
    with hooks(list(registrations)):
        return model(input_ids=ids, attention_mask=mask).logits


def trace_mlps(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, metric: str, corruption: str,
               batch_size: int = 32) -> dict[str, Any]:
    """Causal tracing of every layer's MLP at the subject's last token (module docstring, rule 1): {"effects":
    [IE_L per layer], "total": mean m(clean) - m(corrupted), "order": layers by the rule, "n_prompts"}."""
    examples, _ = build_examples(model, tokenizer, list(prompts), metric=metric, corruption=corruption)
    layout = model_layout(model)
    mlps = [layer_modules(model, layout, i).mlp for i in range(layout.n_layers)]
    effects, totals = torch.zeros(layout.n_layers, dtype=torch.float64), 0.0
    for lo in range(0, len(examples), batch_size):
        part = examples[lo: lo + batch_size]
        last = torch.tensor([max(e.corrupt_positions) if e.corrupt_positions else e.target_positions[0]
                             for e in part])
        m_clean, m_corrupt, m_restored = _traced_batch(model, collate(part).to(input_device(model)), metric,
                                                       corruption, mlps, last)
        effects += (m_restored - m_corrupt).double().sum(1).cpu()
        totals += float((m_clean - m_corrupt).double().sum())
    effects /= len(examples)
    order = sorted(range(layout.n_layers), key=lambda i: (-float(effects[i]), i))
    return {"effects": [round(float(e), 6) for e in effects], "total": round(totals / len(examples), 6),
            "order": order, "n_prompts": len(examples)}


def fact_mlp_masks(model: Any, order: Sequence[int], grads: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """n coordinates of the MLP weights of the layers in `order` (rules 2-3 of the module docstring); `grads`
    holds the forget gradient of each MLP weight (the neuron ranking)."""
    layout, quant = model_layout(model), set(quantizable_names(model))
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    left = n
    for layer in order:
        axes = {name: dim for name, dim in mlp_neuron_axes(layout, layer).items() if name in quant}
        size = sum(params[name].numel() for name in axes)
        if left <= 0 or not axes:
            continue
        if size <= left:
            masks.update({name: torch.ones(params[name].shape, dtype=torch.bool) for name in axes})
            left -= size
            continue
        masks.update(_neurons_within(axes, grads, params, left))
        left = 0
    if left > 0:
        raise ValueError(f"the MLPs hold {n - left} quantizable weights, fewer than the budget of {n}")
    return masks


def _neurons_within(axes: dict[str, int], grads: dict[str, torch.Tensor], params: dict, n: int):
    """n coordinates of one MLP: its neurons by sum |g|, whole while they fit, the rest of the next by |g|."""
    per_neuron = {name: params[name].numel() // params[name].shape[dim] for name, dim in axes.items()}
    score = sum(grads[name].abs().sum([d for d in range(grads[name].dim()) if d != dim]).double()
                for name, dim in axes.items())
    ranked = torch.argsort(score, descending=True, stable=True)
    whole = n // sum(per_neuron.values())
    masks = {name: torch.zeros(params[name].shape, dtype=torch.bool) for name in axes}
    for name, dim in axes.items():
        masks[name].index_fill_(dim, ranked[:whole], True)
    rest = n - whole * sum(per_neuron.values())
    if rest:
        names = list(axes)
        own = [torch.zeros(params[name].shape, dtype=torch.bool).index_fill_(axes[name], ranked[whole:whole + 1], True)
               for name in names]
        values = torch.cat([grads[name].abs()[o].reshape(-1) for name, o in zip(names, own)])
        pick = torch.zeros(values.numel(), dtype=torch.bool)
        pick[torch.topk(values, rest).indices] = True
        for name, o, part in zip(names, own, torch.split(pick, [int(o.sum()) for o in own])):
            masks[name][o] = part  # boolean indexing reads and writes in the same row-major order
    return masks


def localise(choice: str, model: Any, circuit_masks: dict[str, torch.Tensor], *, tokenizer: Any = None,
             prompts: Sequence[Prompt] = (), metric: str = "logit_diff", corruption: str = "counterfactual",
             forget: TokenBatch | None = None, retain: TokenBatch | None = None, seed: int = 0, n_fisher: int = 32,
             damping: float = 1.0) -> Localised:
    """The masks of `choice` with as many quantizable coordinates as `circuit_masks`, and how they were chosen."""
    check_localisation(choice)
    n = budget(model, circuit_masks)
    params = dict(model.named_parameters())
    info: dict[str, Any] = {"choice": choice, "budget": n,
                            "quantizable": sum(params[name].numel() for name in quantizable_names(model))}
    if choice == "circuit":
        return Localised(circuit_masks, {**info, "n_coordinates": n})
    if choice == "random":
        masks = random_masks(model, n, seed)
        info["seed"] = seed
    elif choice == "saliency":
        masks = saliency_masks(model, forget, retain, n, n_fisher=n_fisher, damping=damping, seed=seed)
        info.update(n_fisher=n_fisher, damping=damping)
    else:
        trace = trace_mlps(model, tokenizer, prompts, metric=metric, corruption=corruption)
        index = _quant_index(model)
        grads = index.scatter(forget_gradient(model, forget, index))
        masks = fact_mlp_masks(model, trace["order"], grads, n)
        layout = model_layout(model)
        info.update(trace=trace, layers=[i for i in trace["order"] if set(mlp_neuron_axes(layout, i)) & set(masks)])
    info["n_coordinates"] = budget(model, masks)
    log.info("localisation %s: %d coordinates (the circuit's %d)", choice, info["n_coordinates"], n)
    return Localised(masks, info)
