"""Per-example retain gradients over the circuit's coordinates: the diagonal Fisher and the retain projector.

One backward pass per example (N = max(k, n_fisher) examples): g_j = d NLL(x_j) / d theta restricted to the
circuit (flat, [n]).  F = mean_j g_j^2 over all N; the projector (mansu.unlearn.projection.RetainProjector) keeps
the first k g_j, each stored as it arrives (no stack, no QR).
Memory: k x n x 2 B (bf16 rows) + n x 4 B for F, n = the circuit's coordinates (never k x all parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mansu.devices import input_device
from mansu.unlearn.data import TokenBatch
from mansu.unlearn.objectives import nll_loss
from mansu.unlearn.params import ParamIndex
from mansu.unlearn.projection import RetainProjector


@dataclass(frozen=True)
class RetainStats:
    fisher: torch.Tensor          # [n]
    projector: RetainProjector    # P(g) = g - G^T (G G^T)^+ G g over the k retain gradients
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
                      seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> RetainStats:
    """Diagonal Fisher over n_fisher retain examples and the projector off k per-example gradients (stored in
    `dtype`: bf16 by default, float32 for the projection that equals the dense QR one to fp32 tolerance)."""
    fisher = torch.zeros(index.numel)
    projector = RetainProjector(index.numel, min(k, len(retain)), dtype=dtype)
    count = 0
    for j, g in per_example_grads(model, retain, index, max(k, n_fisher), seed=seed):
        if j < n_fisher:
            fisher += g * g
            count += 1
        if j < k:
            projector.add(g)
    return RetainStats(fisher / max(count, 1), projector.finish(), count)


def fisher_only(model, batch: TokenBatch, index: ParamIndex, n: int, *, seed: int = 0) -> torch.Tensor:
    """Diagonal empirical Fisher of `batch` over n examples (no basis)."""
    fisher = torch.zeros(index.numel)
    count = 0
    for _, g in per_example_grads(model, batch, index, n, seed=seed):
        fisher += g * g
        count += 1
    return fisher / max(count, 1)
