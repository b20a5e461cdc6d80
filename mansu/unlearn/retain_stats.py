"""Per-example retain gradients over the circuit's coordinates: the diagonal Fisher and the retain projector.

One backward pass per example (N = max(k, n_fisher) examples): g_j = d NLL(x_j) / d theta restricted to the
circuit (flat, [n]).  F = mean_j g_j^2 over all N; the projector (mansu.unlearn.projection.RetainProjector) keeps
the first k g_j factored (each Linear's inputs and output gradients, captured by hooks in the same pass).
Memory: n x 4 B for F (on the index's device) + the projector's factors (k x T x (fan_in + fan_out) x 4 B per
weight), n = the circuit's coordinates; each dense g_j exists only while its example is processed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mansu.devices import input_device
from mansu.unlearn.data import TokenBatch
from mansu.unlearn.objectives import nll_loss
from mansu.unlearn.params import ParamIndex
from mansu.unlearn.projection import FactoredRetainProjector


@dataclass(frozen=True)
class RetainStats:
    fisher: torch.Tensor          # [n]
    projector: FactoredRetainProjector  # P(g) = g - G^T (G G^T)^+ G g over the k retain gradients
    n_examples: int


def masked_grad(model, loss: torch.Tensor, index: ParamIndex, *, out: torch.Tensor | None = None,
                alpha: float = 1.0) -> torch.Tensor:
    """d loss / d theta at the coordinates of `index`, flat fp32 [n]; with `out`, alpha times it is added into
    `out` (no second [n] buffer for a retain term).

    Streamed: each parameter's gradient is copied in (and freed) by a post-accumulate hook as soon as backward
    produces it, so at most the parameters being differentiated at that moment hold a gradient, never all of them
    at once (2 B per parameter of an 8B bf16 model)."""
    params = dict(model.named_parameters())
    out = torch.zeros(index.numel, device=index.device) if out is None else out
    targets = [params[n] for n in index.names]
    saved = [p.grad for p in targets]
    handles = []
    for i, (p, off) in enumerate(zip(targets, index.offsets())):
        p.grad = None

        def copy_in(param, i=i, off=off):
            out[off: off + index.size(i)].add_(index.take(i, param.grad).to(out.device), alpha=alpha)
            param.grad = None
        handles.append(p.register_post_accumulate_grad_hook(copy_in))
    try:
        torch.autograd.backward(loss, inputs=targets)
    finally:
        for h, p, g in zip(handles, targets, saved):
            h.remove()
            p.grad = g
    return out


def per_example_grads(model, batch: TokenBatch, index: ParamIndex, n: int, *, seed: int = 0):
    """Yield (j, g_j) for n examples drawn without replacement (all of them if the batch is smaller)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(batch), generator=gen)[: min(n, len(batch))].tolist()
    device = input_device(model)
    for j, i in enumerate(order):
        yield j, masked_grad(model, nll_loss(model, batch.select([i]).to(device)), index)


def retain_statistics(model, retain: TokenBatch, index: ParamIndex, *, k: int, n_fisher: int,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> RetainStats:
    """Diagonal Fisher over n_fisher retain examples and the projector off k per-example gradients (kept
    factored, mansu.unlearn.projection.FactoredRetainProjector, in `dtype`: float32 by default, the projection
    that equals the dense QR one to fp32 tolerance; bf16 halves the factors' memory but its rounding compounds in
    the products D^T A: on the demo MANSU then lost 0.925 vs 0.955 retain accuracy), in one backward pass per
    example."""
    fisher = torch.zeros(index.numel, device=index.device)
    modules = weight_modules(model, index.names)
    transposed = {n: type(m).__name__ == "Conv1D" for n, m in modules.items()}
    projector = FactoredRetainProjector(index, transposed, min(k, len(retain)), dtype=dtype)
    count = 0
    with capture_factors(modules) as factors:
        for j, g in per_example_grads(model, retain, index, max(k, n_fisher), seed=seed):
            if j < n_fisher:
                fisher.addcmul_(g, g)  # no [n] temporary for g * g
                count += 1
            if j < k:
                projector.add(factors)
    return RetainStats(fisher / max(count, 1), projector.finish(), count)


def weight_modules(model, names) -> dict[str, torch.nn.Module]:
    """{weight name: the Linear / Conv1D module that owns it}."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if leaf != "weight" or owner not in modules:
            raise ValueError(f"{name} is not a module's weight; the retain projector factors Linear/Conv1D weights")
        out[name] = modules[owner]
    return out


@contextlib.contextmanager
def capture_factors(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, list]]:
    """While active, {weight name: [A, D]} holds the last forward's inputs A [T, fan_in] of each module and,
    after a backward through it, the gradients D [T, fan_out] at its outputs (both detached, on its device)."""
    store: dict[str, list] = {}
    handles = []

    def hook(name: str):
        def forward(module, inputs, output):
            a = inputs[0].detach()
            store[name] = [a.reshape(-1, a.shape[-1]), None]
            if output.requires_grad:
                output.register_hook(lambda grad: store[name].__setitem__(1, grad.detach().reshape(-1, grad.shape[-1])))
        return forward

    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def fisher_only(model, batch: TokenBatch, index: ParamIndex, n: int, *, seed: int = 0) -> torch.Tensor:
    """Diagonal empirical Fisher of `batch` over n examples (no basis)."""
    fisher = torch.zeros(index.numel, device=index.device)
    count = 0
    for _, g in per_example_grads(model, batch, index, n, seed=seed):
        fisher.addcmul_(g, g)
        count += 1
    return fisher / max(count, 1)
