"""SURE (Zhang et al., arXiv 2410.16454): GradDiff at a large learning rate, the update masked to the weight
rows (output neurons) whose forget-gradient norm is at or above the `sure_percentile` percentile, every step."""

from __future__ import annotations

import torch

from mansu.unlearn.methods.gradient import GradientMethod


class SURE(GradientMethod):
    name = "sure"
    summary = "saliency-masked GradDiff at a large learning rate"
    objective = "ga"
    retain_term = True
    fields = ("sure_lr", "optimizer", "retain_weight", "sure_percentile")
    demo = {"steps": 20, "sure_lr": 1e-3, "retain_weight": 2.0}

    def learning_rate(self) -> float:
        return self.config.sure_lr

    def update_mask(self, g_f: torch.Tensor) -> torch.Tensor:
        """1 on the weight rows whose forget-gradient norm is >= the configured percentile."""
        dense = self.index.scatter(g_f)
        norms = {n: t.reshape(t.shape[0], -1).norm(dim=1) for n, t in dense.items()}
        thr = torch.quantile(torch.cat(list(norms.values())), self.config.sure_percentile / 100.0)
        rowmask = {n: (v >= thr).float().reshape(-1, *([1] * (dense[n].dim() - 1))).expand_as(dense[n])
                   for n, v in norms.items()}
        return self.index.gather(rowmask)
