"""Circuit-restricted null-space projection (after Geometric-Disentanglement Unlearning, 2025).

With G = [g_1 .. g_k] the per-example retain-NLL gradients restricted to the circuit's coordinates (n x k)
and Q an orthonormal basis of span(G) (reduced QR, columns with |R_jj| <= tol * max|R_jj| dropped):

    P(g) = g - Q (Q^T g)

so <P(g), g_j> = 0 for every retain gradient: the retain loss is unchanged to first order by a step along P(g).
P is idempotent and, working on the restricted vector, zero outside the circuit by construction.
"""

from __future__ import annotations

import torch


def orthonormal_basis(gradients: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Q [n, r] (r <= k) with orthonormal columns spanning the rows of `gradients` [k, n]."""
    if gradients.ndim != 2:
        raise ValueError(f"gradients must be [k, n], got shape {tuple(gradients.shape)}")
    q, r = torch.linalg.qr(gradients.float().T, mode="reduced")  # [n, k], [k, k]; fp32 keeps memory k x n x 4 B
    diag = r.diagonal().abs()
    keep = diag > tol * diag.max().clamp(min=1e-300) if diag.numel() else diag.bool()
    return q[:, keep].float()


def project_off(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P(g) = g - Q (Q^T g) for a flat g [n] and basis Q [n, r]."""
    if basis.numel() == 0:
        return g.clone()
    gf = g.float()
    return (gf - basis @ (basis.T @ gf)).to(g.dtype)


def restrict(g: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """g * mask for every masked parameter; parameters without a mask get no update at all."""
    return {n: g[n] * masks[n].to(g[n].device, g[n].dtype) for n in masks if n in g}
