"""MANSU and its ablations (SPEC.md, sections 1-4; the exact equations are in docs/unlearning.md):

    g      = d L_forget / d theta            restricted to the circuit's coordinates (a)
    p      = g - G^T (G G^T)^+ G g           G: k per-example retain gradients (rows, bf16) (b)
    cand   = the ceil(update_fraction * n) untouched coordinates with the largest |p|
    delta  = floor(-lr * p) on cand          each moved >= kappa bin widths, level changed on every
                                             grid of floor_quantizers (default NF4) (d)
    keep   = prefix of cand by |p| with 1/2 sum F_i delta_i^2 <= epsilon (cumulative over steps) (c)

A coordinate is floored once (its whole cumulative update is the floored move from the base weight), so the
floor applies to each parameter's cumulative update.  Ablations are subclasses that switch one part off: no floor
(Adam on p, the cumulative update scaled into the Fisher budget), no circuit (all quantizable weights), no Fisher
bound (epsilon = inf).

Per-coordinate state, on the model's device: Fisher 4 B (fp32), cumulative update 4 B (fp32), proposal and
priority 4 B each (fp32), the index 0 B (a whole tensor) or 4 B (int32, a partial circuit mask), plus the
retain projector's factored per-example gradients (T x (fan_in + fan_out) per example and Linear, fp32; about
k x T x (1/fan_in + 1/fan_out) x 4 B per coordinate: ~1.2 B at k=16, T=64 on an 8B layout).  The floor geometry
is computed for each step's candidates only, from the current weights (nothing kept), and "touched" is
total != 0.  Total: 16-20 B per circuit coordinate (bench/scale_bench.py measures it).  A step adds its [n] fp32
gradient (4 B); the candidate score and the touched mask are computed a chunk at a time inside the selection
(`choose`), never held whole.  Peak for the memory check: `Mansu.peak_bytes`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from mansu.quant.targets import quant_layout
from mansu.unlearn.fisher import bound_clip, bound_scale, fisher_cost
from mansu.unlearn.floor import FloorGeometry, floor_geometry, floor_update
from mansu.unlearn.methods.base import (
    RECORD_CHUNK,
    ChunkedScore,
    FloorNotMetError,
    Method,
    Proposals,
    check_finite,
    chunks,
    make_optimizer,
    top_indices,
)
from mansu.unlearn.params import sub_index
from mansu.unlearn.retain_stats import masked_grad, retain_statistics

MANSU_FIELDS = ("lr", "objective", "beta", "k", "n_fisher", "epsilon", "kappa", "update_fraction", "blocksize",
                "floor_quantizers", "mansu_retain_weight", "selection", "fisher_damping")
# MANSU has no learning rate of its own: the floor sets its moves; the retain term keeps retain accuracy
# (docs/demo_search.md, section 2). update_fraction and steps by the held-out rule (section 6: the smallest
# fraction, then the fewest steps, with forget <= 0.35 in fp and NF4 and retain kept on demo model seed 3):
# 0.002 at 40 steps (0.258 / 0.258, retain lost 0.013; at 20 steps 0.400, retain lost 0.053).
MANSU_DEMO = {"steps": 40, "update_fraction": 0.002, "mansu_retain_weight": 1.0}


class Mansu(Method):
    name = "mansu"
    summary = "circuit-restricted, retain-projected, Fisher-bounded, floored past the NF4 bin (the paper's method)"
    circuit_restricted = True
    floor: ClassVar[bool] = True
    fisher_bound: ClassVar[bool] = True
    fields = MANSU_FIELDS
    demo = MANSU_DEMO
    proposal_dtype = torch.float32  # the floor tuner replays proposal and priority through the floor exactly
    # state: Fisher 4 + total 4 + index 0-4 + retain factors ~1-2; a step adds its gradient (4; the candidate score
    # is chunked and the delta is allocated after the gradient is freed); and for each coordinate a step proposes
    # (update_fraction x steps of them) 16 B of log, its merged copy at the end (16 B, `proposals`) and 12 B of
    # base value in the restore buffer
    peak_bytes_per_coordinate = 18
    bytes_per_candidate: ClassVar[int] = 44

    @classmethod
    def peak_bytes(cls, config) -> float:
        if not cls.floor:
            return cls.peak_bytes_per_coordinate
        return cls.peak_bytes_per_coordinate + cls.bytes_per_candidate * min(1.0, config.update_fraction * config.steps)

    def init_proposals(self) -> None:
        """Floored: a log of each step's candidates (int64 position, fp32 proposal and score: 16 B per candidate,
        update_fraction x n per step), merged at the end; without the floor: dense vectors as other methods."""
        if self.floor:
            self.proposed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        else:
            super().init_proposals()

    def proposals(self, limit: int) -> Proposals:
        if not self.floor:
            return super().proposals(limit)
        if not self.proposed:
            empty = torch.zeros(0, device=self.state_device)
            return Proposals(empty.long(), empty, empty, 0)
        first = merge_first(*(torch.cat(column) for column in zip(*self.proposed)))
        n_total = first.positions.numel()
        if n_total > limit:
            keep = top_indices(first.priority, limit)
            first = Proposals(first.positions[keep], first.proposal[keep], first.priority[keep], n_total)
        return first

    def prepare(self) -> None:
        c = self.config
        self.epsilon = c.epsilon if self.fisher_bound else math.inf
        if c.objective == "npo":
            self.ensure_ref()
        key = (self.index.names, self.index.numel)
        stats = self.cached(("retain", key, c.k, c.n_fisher, c.seed), lambda: retain_statistics(
            self.model, self.retain.to(self.device), self.index, k=c.k, n_fisher=c.n_fisher, seed=c.seed))
        self.fisher, self.projector = stats.fisher, stats.projector
        self.layout = quant_layout(self.model)
        self.spent = 0.0
        self.opt = None if self.floor else make_optimizer(c, self.n, device=self.state_device)
        self.n_candidates = max(1, math.ceil(c.update_fraction * self.n))

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        loss = self.forget_loss(step, self.config.objective)
        g = masked_grad(self.model, loss, self.index)
        if self.config.mansu_retain_weight > 0:  # retain damage accrued so far steers selection and direction
            loss_r = self.retain_loss(step)
            masked_grad(self.model, loss_r, self.index, out=g, alpha=self.config.mansu_retain_weight)
            loss = loss + self.config.mansu_retain_weight * loss_r
        check_finite(loss, g, step)
        grad_norm = float(g.norm())
        removed = self.projector.project_(g)  # g becomes p, in place: the step holds one [n] gradient at a time
        stats = {"loss": float(loss.detach()), "grad_norm": grad_norm, "proj_removed_norm": removed}
        if not self.floor:
            delta, more = self.dense_step(g)
        else:
            chosen = self.choose(g)
            del g  # freed before the step's delta is allocated (peak memory at 8B)
            delta, more = self.floored_step(*chosen, step)
        return delta, {**stats, **more}

    def geometry(self, cand: torch.Tensor) -> FloorGeometry:
        """The floor geometry of the candidates (in cand's order), computed from the current weights one tensor
        at a time: no per-coordinate geometry is kept between steps.  Candidates are untouched coordinates, so
        their current value is the base's, and a floored move never changes any grid's scales (it stays inside
        the block's caps and never moves a scale-setting element), so each block's grid is the base's."""
        order = torch.argsort(cand)
        sub, _ = sub_index(self.index, cand)
        c = self.config
        geo = floor_geometry(dict(self.model.named_parameters()), sub, c.blocksize, layout=self.layout,
                             quantizers=c.floor_quantizers)
        return geo.select(torch.argsort(order))

    def choose(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The step's candidates: the update_fraction x n untouched coordinates of highest score; returns
        (candidates, their proposal -lr p, their score, coordinates touched before this step).  The score is a
        ChunkedScore: computed a chunk at a time (and at the candidates) from p, the Fisher and the cumulative
        update, so the step holds no [n] score or touched mask beside p (5 B per coordinate at 8B)."""
        damping = self.damping()

        def untouched_score(key: slice | torch.Tensor) -> torch.Tensor:
            # a floored coordinate moved by at least one code change: its total is never 0
            return self.score(p[key], self.fisher[key], damping).masked_fill_(self.total[key] != 0, 0)

        score = ChunkedScore(self.n, untouched_score, p.device)
        cand = top_indices(score, min(self.n_candidates, score.count_nonzero()))
        n_touched = sum(int(torch.count_nonzero(self.total[lo: lo + RECORD_CHUNK])) for lo in chunks(self.n))
        return cand, -self.config.lr * p[cand], score[cand], n_touched

    def floored_step(self, cand: torch.Tensor, prop: torch.Tensor, score: torch.Tensor, n_before: int,
                     step: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        k = cand.numel()
        floored, feasible = floor_update(prop, self.geometry(cand), c.kappa)
        bound = bound_clip(floored, self.fisher[cand], self.epsilon, priority=score, spent=self.spent)
        kept = bound.delta != 0
        delta = self.zeros()
        delta[cand[kept]] = bound.delta[kept]
        self.spent += bound.cost
        self.proposed.append((cand, prop, score))
        if step == 0 and not bool(kept.any()):
            self.floor_not_met(cand, floored, feasible)
        n_touched = n_before + int(kept.sum())
        return delta, {"n_candidates": int(k), "n_floored": int(kept.sum()), "n_unfloorable": int((~feasible).sum()),
                       "n_dropped": bound.n_dropped, "n_touched": n_touched,
                       "fisher_cost": self.spent, "budget_used": self._used(self.spent)}

    def damping(self) -> float:
        """The Fisher score's damping, fisher_damping x mean F (over all coordinates, once per step)."""
        return self.config.fisher_damping * float(self.fisher.mean()) + 1e-30

    def score(self, p: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
        """Candidate priority of the coordinates of p (and their Fisher): |p_i|, or |p_i| / sqrt(F_i + damping)
        (forget vs retain sensitivity)."""
        if self.config.selection == "gradient":
            return p.abs()
        score = fisher.add(damping).sqrt_()  # one buffer: the denominator, then the score in place
        return torch.div(p, score, out=score).abs_()

    def floor_not_met(self, cand: torch.Tensor, floored: torch.Tensor, feasible: torch.Tensor) -> None:
        if not bool(feasible.any()):
            raise FloorNotMetError(f"floor cannot be met: none of {cand.numel()} candidate parameters can change its "
                                   f"level under {self.config.floor_quantizers} without changing a scale "
                                   f"(kappa={self.config.kappa})")
        costs = 0.5 * self.fisher[cand][feasible] * floored[feasible] ** 2
        raise FloorNotMetError(
            f"floor cannot be met inside the Fisher budget: the cheapest floored move of {int(feasible.sum())} "
            f"candidates costs {float(costs.min()):.3g} (1/2 F delta^2) > epsilon={self.epsilon:.3g} "
            f"(kappa={self.config.kappa}); raise epsilon or lower kappa")

    def dense_step(self, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
        step = self.opt.step(p)
        new = self.total + step
        dropped = 0
        if math.isfinite(self.epsilon):
            bounded = (bound_scale if self.config.fisher_mode == "scale" else bound_clip)(new, self.fisher,
                                                                                          self.epsilon)
            new, dropped = bounded.delta, bounded.n_dropped
        self.record_proposal(step, p.abs())
        cost = fisher_cost(new, self.fisher)
        return new - self.total, {"n_updated": int(torch.count_nonzero(new)), "n_floored": 0, "n_dropped": dropped,
                                "fisher_cost": cost, "budget_used": self._used(cost)}

    def _used(self, cost: float) -> float:
        return cost / self.epsilon if math.isfinite(self.epsilon) else 0.0


class MansuNoFloor(Mansu):
    name = "mansu_no_floor"
    summary = "MANSU ablation: Adam on the projected gradient, no magnitude floor"
    floor = False
    fields = (*MANSU_FIELDS, "optimizer", "fisher_mode")
    # Fisher 4 + total 4 + proposal and priority 8 + Adam 8, and a step's gradient, Adam step, new total, delta 16
    peak_bytes_per_coordinate = 40
    demo = {**MANSU_DEMO, "lr": 3e-4}


class MansuNoCircuit(Mansu):
    name = "mansu_no_circuit"
    summary = "MANSU ablation: every quantizable weight may change (no circuit restriction)"
    circuit_restricted = False


class MansuNoFisher(Mansu):
    name = "mansu_no_fisher"
    summary = "MANSU ablation: no Fisher bound on retain damage (epsilon = inf)"
    fisher_bound = False
    fields = tuple(f for f in MANSU_FIELDS if f != "epsilon")




def merge_first(pos: torch.Tensor, prop: torch.Tensor, score: torch.Tensor) -> Proposals:
    """Per distinct position (sorted): the first nonzero proposal in log order and the largest score."""
    uniq, inverse = torch.unique(pos, return_inverse=True)
    priority = torch.zeros(uniq.numel(), dtype=score.dtype, device=score.device).scatter_reduce_(
        0, inverse, score, "amax", include_self=False)
    order = torch.arange(pos.numel(), device=pos.device)
    big = pos.numel()
    nz = prop != 0
    first = torch.full((uniq.numel(),), big, dtype=torch.long, device=pos.device).scatter_reduce_(
        0, inverse[nz], order[nz], "amin", include_self=True)
    proposal = torch.where(first < big, prop[first.clamp(max=big - 1)], torch.zeros_like(priority))
    return Proposals(uniq, proposal.float(), priority.float(), uniq.numel())
