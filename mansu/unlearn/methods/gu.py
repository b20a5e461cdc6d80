"""Geometric-Disentanglement unlearning (GU): the forget gradient projected off the span of k per-example retain
gradients, so retain loss is unchanged to first order: g <- g - G^T (G G^T)^+ G g (mansu.unlearn.projection).
State: Adam's m and v 8 B/coordinate, proposal/priority 8 B, the k bf16 retain gradients 2k B."""

from __future__ import annotations

import torch

from mansu.unlearn.methods.gradient import GradientMethod
from mansu.unlearn.retain_stats import retain_statistics


class GU(GradientMethod):
    name = "gu"
    summary = "forget gradient projected off the retain-gradient span (no floor, no circuit)"
    objective = None
    fields = (*GradientMethod.fields, "objective", "k")
    # the held-out rule (docs/demo_search.md section 6) keeps 1e-4: the smallest lr forgetting >= half the
    # headroom in fp on demo model seed 3 (0.54; 3e-5: 0.17)
    demo = {"steps": 20, "lr": 1e-4}

    def prepare(self) -> None:
        super().prepare()
        stats = retain_statistics(self.model, self.retain, self.index, k=self.config.k, n_fisher=1,
                                  seed=self.config.seed)
        self.projector = stats.projector

    def direction_(self, g: torch.Tensor) -> float:
        return self.projector.project_(g)
