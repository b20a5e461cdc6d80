"""Small statistics used to compare attributions: Spearman rank correlation (average ranks for ties)."""

from __future__ import annotations

import torch


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) of a 1-D tensor; tied values share the mean of their ranks."""
    values = values.double().flatten()
    order = torch.argsort(values)
    sorted_vals = values[order]
    out = torch.empty_like(values)
    i, n = 0, len(values)
    while i < n:
        j = i
        while j + 1 < n and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two equal-length 1-D tensors (Pearson correlation of their average ranks)."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two tensors of equal length >= 2, got {a.numel()} and {b.numel()}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0
