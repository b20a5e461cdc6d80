"""Per-example retain gradients over the circuit's coordinates: the diagonal Fisher and the projection basis.

One backward pass per example (N = max(k, n_fisher) examples): g_j = d NLL(x_j) / d theta restricted to the
circuit (flat, [n]).  F = mean_j g_j^2 over all N; the basis is an orthonormal basis of the first k g_j.
Memory: k x n for the basis plus n for F, n = the circuit's coordinates (never k x all parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mansu.devices import input_device
from mansu.unlearn.data import TokenBatch
from mansu.unlearn.objectives import nll_loss
from mansu.unlearn.params import ParamIndex
from mansu.unlearn.projection import orthonormal_basis


@dataclass(frozen=True)
class RetainStats:
    fisher: torch.Tensor  # [n]
    basis: torch.Tensor   # [n, r], r <= k
    n_examples: int


def masked_grad(model, loss: torch.Tensor, index: ParamIndex) -> torch.Tensor:
    """d loss / d theta at the coordinates of `index`, flat fp32 [n]."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in index.names], allow_unused=True)
    return index.gather({n: g for n, g in zip(index.names, grads) if g is not None})


def per_example_grads(model, batch: TokenBatch, index: ParamIndex, n: int, *, seed: int = 0):
    """Yield (j, g_j) for n examples drawn without replacement (all of them if the batch is smaller)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(batch), generator=gen)[: min(n, len(batch))].tolist()
    device = input_device(model)
    for j, i in enumerate(order):
        yield j, masked_grad(model, nll_loss(model, batch.select([i]).to(device)), index)


def retain_statistics(model, retain: TokenBatch, index: ParamIndex, *, k: int, n_fisher: int,
                      seed: int = 0) -> RetainStats:
    """Diagonal Fisher over n_fisher retain examples and the orthonormal basis of k per-example gradients."""
    fisher = torch.zeros(index.numel)
    rows: list[torch.Tensor] = []
    count = 0
    for j, g in per_example_grads(model, retain, index, max(k, n_fisher), seed=seed):
        if j < n_fisher:
            fisher += g * g
            count += 1
        if j < k:
            rows.append(g)
    basis = orthonormal_basis(torch.stack(rows)) if rows else torch.zeros(index.numel, 0)
    return RetainStats(fisher / max(count, 1), basis, count)


def fisher_only(model, batch: TokenBatch, index: ParamIndex, n: int, *, seed: int = 0) -> torch.Tensor:
    """Diagonal empirical Fisher of `batch` over n examples (no basis)."""
    fisher = torch.zeros(index.numel)
    count = 0
    for _, g in per_example_grads(model, batch, index, n, seed=seed):
        fisher += g * g
        count += 1
    return fisher / max(count, 1)
