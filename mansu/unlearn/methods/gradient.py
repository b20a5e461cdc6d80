"""Gradient baselines: a forget objective (GA, NPO or SimNPO), optionally a retain NLL term, one optimizer.

    g     = d L_forget / d theta  (+ retain_weight * d L_retain / d theta when `retain_term`)
    delta = optimizer(direction(g))   masked by `update_mask` when a subclass defines one (SURE)

Each baseline (ga.py, graddiff.py, npo.py, ...) is a subclass that sets its objective and overrides at most
one hook.  State on the model's device: Adam's m and v 8 B/coordinate (SGD: none) + the base class's total,
proposal and priority 8 B = 16 B per coordinate.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mansu.unlearn.methods.base import Method, abs_score, check_finite, make_optimizer
from mansu.unlearn.retain_stats import masked_grad


class GradientMethod(Method):
    objective: ClassVar[str | None] = "ga"    # forget objective; None = the config's `objective`
    retain_term: ClassVar[bool] = False       # add retain_weight * retain NLL
    fields = ("lr", "optimizer")

    def learning_rate(self) -> float:
        return self.config.lr

    def prepare(self) -> None:
        self.kind = self.objective or self.config.objective
        if self.kind == "npo":
            self.ensure_ref()
        self.opt = make_optimizer(self.config, self.n, self.learning_rate(), self.state_device)

    def direction_(self, g: torch.Tensor) -> float:
        """Turn the forget gradient into the forget direction in place (GU projects it); returns the norm of what
        was removed."""
        return 0.0

    def update_mask(self, g_f: torch.Tensor) -> torch.Tensor | None:
        """A 0/1 mask on the update (SURE's saliency mask), or None."""
        return None

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        """One step with the fewest [n] buffers: the forget gradient becomes the direction and takes the retain term
        in place, once its norm, its priority (bf16) and SURE's mask are read from it."""
        loss_f = self.forget_loss(step, self.kind)
        g = masked_grad(self.model, loss_f, self.index)
        grad_norm, score, mask = float(g.norm()), abs_score(g, self.proposal_dtype), self.update_mask(g)
        removed, loss = self.direction_(g), loss_f
        if self.retain_term:
            loss_r = self.retain_loss(step)
            masked_grad(self.model, loss_r, self.index, out=g, alpha=self.config.retain_weight)
            loss = loss_f + self.config.retain_weight * loss_r
        check_finite(loss, g, step)
        delta = self.opt.step_(g if mask is None else g.mul_(mask))  # the step takes g's buffer
        del g
        if mask is not None:
            delta.mul_(mask)  # the mask applies to the update itself (Adam's moments would leak otherwise)
        self.record_proposal(delta, score)
        return delta, {"loss": float(loss.detach()), "grad_norm": grad_norm, "proj_removed_norm": removed,
                       "n_updated": int(torch.count_nonzero(delta)),
                       "n_masked": self.n if mask is None else int(torch.count_nonzero(mask))}
