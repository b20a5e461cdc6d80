"""The diagonal-Fisher retain bound.

Empirical diagonal Fisher of the retain set over the circuit's coordinates, from per-example NLL gradients:
    F_i = (1/N) sum_{x in retain} (d NLL(x) / d theta_i)^2
Second-order retain damage of an update delta (the KL / NLL increase to second order at a minimum):
    D(delta) = 1/2 sum_i F_i delta_i^2       and the bound keeps D(delta) <= epsilon.
Two ways to enforce it:  scale: delta <- delta * sqrt(epsilon / D) when D > epsilon (dense updates);
                          clip:  keep coordinates in priority order while the running D stays <= epsilon,
                                 drop the rest (sparse, floored updates: a floored move cannot be scaled down).
`budget_used` = D / epsilon of the returned update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fisher_cost(delta: torch.Tensor, fisher: torch.Tensor) -> float:
    """D(delta) = 1/2 sum F_i delta_i^2."""
    return float(0.5 * (fisher.double() * delta.double() ** 2).sum())


@dataclass(frozen=True)
class BoundResult:
    delta: torch.Tensor
    cost: float
    budget_used: float  # cost / epsilon
    n_dropped: int
    scale: float


def bound_scale(delta: torch.Tensor, fisher: torch.Tensor, epsilon: float) -> BoundResult:
    """Scale delta down uniformly so that D(delta) <= epsilon (unchanged when already inside)."""
    cost = fisher_cost(delta, fisher)
    scale = 1.0 if cost <= epsilon else (epsilon / cost) ** 0.5 * (1 - 1e-6)  # slack for fp32 rounding
    out = delta * scale
    new_cost = fisher_cost(out, fisher)
    while new_cost > epsilon:  # rounding left it a hair over: shrink until the bound really holds
        scale *= 1 - 1e-6
        out = delta * scale
        new_cost = fisher_cost(out, fisher)
    return BoundResult(out, new_cost, new_cost / epsilon, 0, scale)


def bound_clip(delta: torch.Tensor, fisher: torch.Tensor, epsilon: float, priority: torch.Tensor | None = None,
               spent: float = 0.0) -> BoundResult:
    """Keep nonzero coordinates in descending `priority` (default |delta|) while spent + running D <= epsilon."""
    nz = torch.nonzero(delta != 0, as_tuple=False).reshape(-1)
    prio = (priority if priority is not None else delta.abs())[nz]
    order = nz[torch.argsort(prio, descending=True, stable=True)]
    costs = 0.5 * fisher.double()[order] * delta.double()[order] ** 2
    fits = spent + torch.cumsum(costs, 0) <= epsilon
    # a cumulative prefix: the first coordinate that does not fit ends the selection (no cherry-picking cheap ones)
    n_keep = int(fits.long().cumprod(0).sum())
    out = torch.zeros_like(delta)
    keep = order[:n_keep]
    out[keep] = delta[keep]
    cost = float(costs[:n_keep].sum())
    return BoundResult(out, cost, (spent + cost) / epsilon, int(order.numel() - n_keep), 1.0)
