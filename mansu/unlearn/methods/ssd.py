"""Selective Synaptic Dampening (Foster et al. 2024), one shot:
theta_i <- theta_i * min(lambda F_r,i / F_f,i, 1) where F_f,i > alpha F_r,i (F: diagonal Fisher)."""

from __future__ import annotations

import torch

from mansu.unlearn.methods.base import Method
from mansu.unlearn.retain_stats import fisher_only

IDLE = {"loss": 0.0, "grad_norm": 0.0, "proj_removed_norm": 0.0, "n_updated": 0}


class SSD(Method):
    name = "ssd"
    summary = "selective synaptic dampening (one shot, Fisher ratio)"
    fields = ("n_fisher", "ssd_alpha", "ssd_lambda")
    demo = {"steps": 1}

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        if step > 0:  # one shot: later steps change nothing
            return torch.zeros(self.n), dict(IDLE)
        c = self.config
        f_r = fisher_only(self.model, self.retain.to(self.device), self.index, c.n_fisher, seed=c.seed)
        f_f = fisher_only(self.model, self.forget.to(self.device), self.index, c.n_fisher, seed=c.seed)
        self.fisher = f_r
        theta = self.index.gather(dict(self.model.named_parameters()))
        select = f_f > c.ssd_alpha * f_r
        factor = torch.where(select, (c.ssd_lambda * f_r / f_f.clamp(min=1e-30)).clamp(max=1.0), torch.ones_like(f_r))
        delta = theta * (factor - 1)
        self.proposal, self.priority = delta.clone(), f_f
        return delta, {**IDLE, "grad_norm": float(f_f.sum().sqrt()), "n_updated": int(torch.count_nonzero(delta))}
