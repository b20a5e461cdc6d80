"""RMU (Li et al. 2024, WMDP): steer layer-l activations of forget inputs to c * u (u a random unit vector), keep
retain activations at their frozen values (weight alpha); only the MLP down_proj of three middle layers change."""

from __future__ import annotations

import torch

from mansu.unlearn import objectives as obj
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.methods.base import Method, abs_score, check_finite, make_optimizer
from mansu.unlearn.params import ParamIndex, full_masks, index_from_masks, quantizable_names
from mansu.unlearn.retain_stats import masked_grad


def rmu_layers(model) -> list[int]:
    """Three middle decoder layers (WMDP's choice, e.g. 5,6,7 of 32), or all there are on a shallow model."""
    n = model.config.num_hidden_layers
    if n <= 3:
        return list(range(n))
    mid = n // 2
    return [mid - 2, mid - 1, mid]


class RMU(Method):
    name = "rmu"
    summary = "representation misdirection: steer forget activations to a random direction"
    fields = ("lr", "optimizer", "rmu_steering", "rmu_alpha")
    # WMDP's coefficients; scaled to the demo's width (c ~ 5 x activation norm) RMU still cannot forget the demo's
    # facts without losing retain as fast (docs/demo_search.md, section 1c), so they stay as published
    demo = {"steps": 20, "lr": 5e-5}

    @classmethod
    def coordinates(cls, model, config: UnlearnConfig, masks) -> ParamIndex:
        layers = rmu_layers(model)
        names = [n for n in quantizable_names(model) if any(f".layers.{l}." in n for l in layers) and "down_proj" in n]
        if not names:
            raise ValueError("RMU needs MLP down_proj weights (Llama-style names '...layers.N.mlp.down_proj.weight')")
        return index_from_masks(full_masks(model, names), model)

    def prepare(self) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        u = torch.rand(self.model.config.hidden_size, generator=gen)
        self.control = (self.config.rmu_steering * u / u.norm()).to(self.device)
        self.opt = make_optimizer(self.config, self.n, device=self.state_device)
        self.layer = rmu_layers(self.model)[-1]
        with torch.no_grad():
            self.frozen = obj.hidden_at(self.model, self.retain.to(self.device), self.layer).detach()

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        fb, _ = self.batch("forget", step)
        rb, ridx = self.batch("retain", step)
        frozen = self.frozen[torch.as_tensor(ridx)][:, : rb.input_ids.shape[1]]
        loss = obj.rmu_loss(self.model, fb, rb, self.layer, self.control, frozen, self.config.rmu_alpha)
        g = masked_grad(self.model, loss, self.index)
        check_finite(loss, g, step)
        grad_norm, score = float(g.norm()), abs_score(g, self.proposal_dtype)
        delta = self.opt.step_(g)  # the step takes g's buffer
        self.record_proposal(delta, score)
        return delta, {"loss": float(loss.detach()), "grad_norm": grad_norm, "proj_removed_norm": 0.0,
                       "n_updated": int(torch.count_nonzero(delta))}
