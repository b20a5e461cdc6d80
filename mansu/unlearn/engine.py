"""The unlearning loop: MANSU, its ablations and the baselines behind one interface, the same per-step stats.

    run_unlearning(model, forget, retain, config, masks=None, on_step=None) -> UnlearnResult

Each method is a small class with `prepare()` (one-time statistics) and `step(i) -> (delta [n], stats)`; the
loop checks the loss is finite, applies the step through `params.apply_update` (the only parameter writer)
and reports stats.  MANSU's step (SPEC.md, sections 2-4):

    g      = d L_forget / d theta            restricted to the circuit's coordinates (a)
    p      = g - Q Q^T g                     Q: orthonormal basis of k per-example retain gradients (b)
    cand   = the ceil(update_fraction * n) untouched coordinates with the largest |p|
    delta  = floor(-lr * p) on cand          each moved >= kappa bin widths, NF4 code changed (d)
    keep   = prefix of cand by |p| with 1/2 sum F_i delta_i^2 <= epsilon (cumulative over steps) (c)

A coordinate is floored once (its whole cumulative update is the floored move from the base weight), so the
floor applies to each parameter's cumulative update.  Ablations: no floor (Adam on p, cumulative update
scaled into the Fisher budget), no circuit (all quantizable weights), no Fisher bound (epsilon = inf).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.data import TokenBatch, batch_indices
from mansu.unlearn.fisher import bound_clip, bound_scale, fisher_cost
from mansu.unlearn.floor import floor_geometry, floor_update
from mansu.unlearn import objectives as obj
from mansu.unlearn.params import ParamIndex, apply_update, full_masks, index_from_masks, quantizable_names
from mansu.unlearn.projection import project_off
from mansu.unlearn.retain_stats import fisher_only, masked_grad, retain_statistics

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient: the run stops at `step` before applying it."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at unlearning step {step}; the run stopped before applying it")
        self.step, self.value = step, value


class EmptyCircuitError(ValueError):
    pass


class FloorNotMetError(ValueError):
    pass


@dataclass
class UnlearnResult:
    index: ParamIndex
    delta: torch.Tensor                 # cumulative applied update, flat [n]
    steps: list[dict]
    proposal: torch.Tensor              # the un-floored signed proposal of each candidate coordinate (0 = never)
    priority: torch.Tensor              # |projected forget gradient| (or |update|) when it was proposed
    fisher: torch.Tensor | None         # retain diagonal Fisher over the coordinates, when the method computed it
    summary: dict = field(default_factory=dict)


class Adam:
    """Plain Adam on a flat vector, returning the step instead of writing it (bias-corrected)."""

    def __init__(self, n: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.m, self.v, self.t = torch.zeros(n), torch.zeros(n), 0
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps

    def step(self, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mhat = self.m / (1 - self.b1 ** self.t)
        vhat = self.v / (1 - self.b2 ** self.t)
        return -self.lr * mhat / (vhat.sqrt() + self.eps)


class Sgd:
    """delta = -lr * g."""

    def __init__(self, lr: float):
        self.lr = lr

    def step(self, g: torch.Tensor) -> torch.Tensor:
        return -self.lr * g


def make_optimizer(config: UnlearnConfig, n: int, lr: float | None = None) -> Adam | Sgd:
    lr = config.lr if lr is None else lr
    return Adam(n, lr) if config.optimizer == "adam" else Sgd(lr)


class Method:
    """Shared plumbing: batches, the forget objective, stats bookkeeping."""

    def __init__(self, model, forget: TokenBatch, retain: TokenBatch, config: UnlearnConfig, index: ParamIndex):
        self.model, self.forget, self.retain, self.config, self.index = model, forget, retain, config, index
        self.device = model.get_input_embeddings().weight.device
        self.n = index.numel
        self.proposal = torch.zeros(self.n)
        self.priority = torch.zeros(self.n)
        self.fisher: torch.Tensor | None = None
        self.ref: torch.Tensor | None = None
        self.cache: dict | None = None  # shared across runs on the same base weights (compare), keyed by settings

    def cached(self, key, compute):
        if self.cache is None:
            return compute()
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def prepare(self) -> None:
        pass

    def batch(self, which: str, step: int) -> tuple[TokenBatch, list[int]]:
        data = self.forget if which == "forget" else self.retain
        idx = batch_indices(len(data), self.config.batch_size, step, self.config.seed + (0 if which == "forget" else 7))
        return data.select(idx).to(self.device), idx

    def forget_loss(self, step: int, kind: str) -> torch.Tensor:
        fb, idx = self.batch("forget", step)
        if kind == "ga":
            return obj.ga_loss(self.model, fb)
        if kind == "npo":
            return obj.npo_loss(self.model, fb, self.ref[idx].to(self.device), self.config.beta)
        if kind == "simnpo":
            return obj.simnpo_loss(self.model, fb, self.config.beta, self.config.simnpo_gamma)
        raise ValueError(f"unknown forget objective {kind!r}: accepted are ga, npo, simnpo")

    def ensure_ref(self) -> None:
        if self.ref is None:
            self.ref = obj.reference_logprobs(self.model, self.forget.to(self.device)).cpu()

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def _check_finite(loss: torch.Tensor, g: torch.Tensor | None, step: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value) or (g is not None and not bool(torch.isfinite(g).all())):
        raise NonFiniteLossError(step, value if not math.isfinite(value) else float("nan"))


class GradientBaseline(Method):
    """GA, GradDiff, NPO(+retain), SimNPO(+retain), GU (projected), SURE (saliency-masked GradDiff)."""

    FORGET = {"ga": "ga", "graddiff": "ga", "npo": "npo", "simnpo": "simnpo", "sure": "ga", "gu": None}
    RETAIN = {"graddiff", "npo", "simnpo", "sure"}

    def prepare(self) -> None:
        method = self.config.method
        self.kind = self.FORGET[method] or self.config.objective
        if self.kind == "npo":
            self.ensure_ref()
        lr = self.config.sure_lr if method == "sure" else self.config.lr
        self.opt = make_optimizer(self.config, self.n, lr)
        if method == "gu":
            stats = retain_statistics(self.model, self.retain, self.index, k=self.config.k,
                                      n_fisher=1, seed=self.config.seed)
            self.basis = stats.basis

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        method = self.config.method
        loss_f = self.forget_loss(step, self.kind)
        g_f = masked_grad(self.model, loss_f, self.index)
        loss, g, removed, n_masked = loss_f, g_f, 0.0, self.n
        if method == "gu":
            g = project_off(g_f, self.basis)
            removed = float((g_f - g).norm())
        if method in self.RETAIN:
            rb, _ = self.batch("retain", step)
            loss_r = obj.nll_loss(self.model, rb)
            g = g + self.config.retain_weight * masked_grad(self.model, loss_r, self.index)
            loss = loss_f + self.config.retain_weight * loss_r
        _check_finite(loss, g, step)
        mask = self.sure_mask(g_f) if method == "sure" else None
        if mask is not None:
            g = g * mask
            n_masked = int(mask.sum())
        delta = self.opt.step(g)
        if mask is not None:
            delta = delta * mask  # the mask applies to the update itself (Adam's moments would leak otherwise)
        new = self.proposal == 0
        self.proposal[new] = delta[new]
        self.priority = torch.maximum(self.priority, g_f.abs())
        return delta, {"loss": float(loss.detach()), "grad_norm": float(g_f.norm()), "proj_removed_norm": removed,
                       "n_updated": int((delta != 0).sum()), "n_masked": n_masked}

    def sure_mask(self, g_f: torch.Tensor) -> torch.Tensor:
        """1 on the weight rows (output neurons) whose forget-gradient norm is >= the configured percentile."""
        dense = self.index.scatter(g_f)
        norms = {n: t.reshape(t.shape[0], -1).norm(dim=1) for n, t in dense.items()}
        allnorms = torch.cat(list(norms.values()))
        thr = torch.quantile(allnorms, self.config.sure_percentile / 100.0)
        rowmask = {n: (v >= thr).float().reshape(-1, *([1] * (dense[n].dim() - 1))).expand_as(dense[n])
                   for n, v in norms.items()}
        return self.index.gather(rowmask)


class Mansu(Method):
    """MANSU and its ablations (see the module docstring)."""

    def prepare(self) -> None:
        c = self.config
        self.floor = c.method != "mansu_no_floor"
        self.epsilon = math.inf if c.method == "mansu_no_fisher" else c.epsilon
        if c.objective == "npo":
            self.ensure_ref()
        key = (self.index.names, self.index.numel)
        stats = self.cached(("retain", key, c.k, c.n_fisher, c.seed), lambda: retain_statistics(
            self.model, self.retain.to(self.device), self.index, k=c.k, n_fisher=c.n_fisher, seed=c.seed))
        self.fisher, self.basis = stats.fisher, stats.basis
        params = {n: p.detach().cpu() for n, p in self.model.named_parameters() if n in self.index.names}
        self.geo = self.cached(("geometry", key, c.blocksize),
                               lambda: floor_geometry(params, self.index, c.blocksize)) if self.floor else None
        self.touched = torch.zeros(self.n, dtype=torch.bool)
        self.cum = torch.zeros(self.n)
        self.spent = 0.0
        self.opt = None if self.floor else make_optimizer(c, self.n)
        self.n_candidates = max(1, math.ceil(c.update_fraction * self.n))

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        loss = self.forget_loss(step, self.config.objective)
        g = masked_grad(self.model, loss, self.index)
        if self.config.mansu_retain_weight > 0:  # retain damage accrued so far steers selection and direction
            rb, _ = self.batch("retain", step)
            loss_r = obj.nll_loss(self.model, rb)
            g = g + self.config.mansu_retain_weight * masked_grad(self.model, loss_r, self.index)
            loss = loss + self.config.mansu_retain_weight * loss_r
        _check_finite(loss, g, step)
        p = project_off(g, self.basis)
        stats = {"loss": float(loss.detach()), "grad_norm": float(g.norm()), "proj_removed_norm": float((g - p).norm())}
        delta, more = self.floored_step(p, step) if self.floor else self.dense_step(p)
        self.cum += delta
        return delta, {**stats, **more}

    def floored_step(self, p: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        score = self.score(p).masked_fill(self.touched, 0)
        k = min(self.n_candidates, int((score > 0).sum()))
        cand = torch.topk(score, k).indices if k else torch.zeros(0, dtype=torch.long)
        prop = -c.lr * p[cand]
        floored, feasible = floor_update(prop, self.geo.select(cand), c.kappa)
        bound = bound_clip(floored, self.fisher[cand], self.epsilon, priority=score[cand], spent=self.spent)
        kept = bound.delta != 0
        delta = torch.zeros(self.n)
        delta[cand[kept]] = bound.delta[kept]
        self.touched[cand[kept]] = True
        self.spent += bound.cost
        self.proposal[cand] = torch.where(self.proposal[cand] == 0, prop, self.proposal[cand])
        self.priority[cand] = torch.maximum(self.priority[cand], score[cand])
        n_unfloorable = int((~feasible).sum())
        if step == 0 and not bool(kept.any()):
            self.floor_not_met(cand, floored, feasible)
        return delta, {"n_candidates": int(k), "n_floored": int(kept.sum()), "n_unfloorable": n_unfloorable,
                       "n_dropped": bound.n_dropped, "n_touched": int(self.touched.sum()),
                       "fisher_cost": self.spent, "budget_used": self._used(self.spent)}

    def score(self, p: torch.Tensor) -> torch.Tensor:
        """Candidate priority: |p_i|, or |p_i| / sqrt(F_i + damping * mean F) (forget vs retain sensitivity)."""
        if self.config.selection == "gradient":
            return p.abs()
        damp = self.config.fisher_damping * float(self.fisher.mean()) + 1e-30
        return p.abs() / (self.fisher + damp).sqrt()

    def floor_not_met(self, cand: torch.Tensor, floored: torch.Tensor, feasible: torch.Tensor) -> None:
        if not bool(feasible.any()):
            raise FloorNotMetError(f"floor cannot be met: none of {cand.numel()} candidate parameters can change its "
                                   f"NF4 code without changing its block absmax (kappa={self.config.kappa})")
        costs = 0.5 * self.fisher[cand][feasible] * floored[feasible] ** 2
        cheapest = float(costs.min())
        raise FloorNotMetError(
            f"floor cannot be met inside the Fisher budget: the cheapest floored move of {int(feasible.sum())} "
            f"candidates costs {cheapest:.3g} (1/2 F delta^2) > epsilon={self.epsilon:.3g} "
            f"(kappa={self.config.kappa}); raise epsilon or lower kappa")

    def dense_step(self, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
        step = self.opt.step(p)
        new = self.cum + step
        if math.isfinite(self.epsilon):
            bounded = (bound_scale if self.config.fisher_mode == "scale" else bound_clip)(new, self.fisher, self.epsilon)
            new, dropped = bounded.delta, bounded.n_dropped
        else:
            dropped = 0
        delta = new - self.cum
        fresh = self.proposal == 0
        self.proposal[fresh] = step[fresh]
        self.priority = torch.maximum(self.priority, p.abs())
        cost = fisher_cost(new, self.fisher)
        return delta, {"n_updated": int((new != 0).sum()), "n_floored": 0, "n_dropped": dropped,
                       "fisher_cost": cost, "budget_used": self._used(cost)}

    def _used(self, cost: float) -> float:
        return cost / self.epsilon if math.isfinite(self.epsilon) else 0.0


class Rmu(Method):
    """RMU: steer layer-l activations of forget inputs to c * u (u random unit), keep retain activations."""

    def prepare(self) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        d = self.model.config.hidden_size
        u = torch.rand(d, generator=gen)
        self.control = (self.config.rmu_steering * u / u.norm()).to(self.device)
        self.opt = make_optimizer(self.config, self.n)
        with torch.no_grad():
            self.frozen = obj.hidden_at(self.model, self.retain.to(self.device), self.layer).detach()

    @property
    def layer(self) -> int:
        return rmu_layers(self.model)[-1]

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        fb, _ = self.batch("forget", step)
        rb, ridx = self.batch("retain", step)
        ix = torch.as_tensor(ridx)
        frozen = self.frozen[ix][:, : rb.input_ids.shape[1]]
        loss = obj.rmu_loss(self.model, fb, rb, self.layer, self.control, frozen, self.config.rmu_alpha)
        g = masked_grad(self.model, loss, self.index)
        _check_finite(loss, g, step)
        delta = self.opt.step(g)
        fresh = self.proposal == 0
        self.proposal[fresh] = delta[fresh]
        self.priority = torch.maximum(self.priority, g.abs())
        return delta, {"loss": float(loss.detach()), "grad_norm": float(g.norm()), "proj_removed_norm": 0.0,
                       "n_updated": int((delta != 0).sum())}


class Ssd(Method):
    """Selective Synaptic Dampening (Foster et al. 2024): one shot,
    theta_i <- theta_i * min(lambda F_r,i / F_f,i, 1) where F_f,i > alpha F_r,i."""

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        if step > 0:  # one-shot: later steps change nothing
            return torch.zeros(self.n), {"loss": 0.0, "grad_norm": 0.0, "proj_removed_norm": 0.0, "n_updated": 0}
        c = self.config
        f_r = fisher_only(self.model, self.retain.to(self.device), self.index, c.n_fisher, seed=c.seed)
        f_f = fisher_only(self.model, self.forget.to(self.device), self.index, c.n_fisher, seed=c.seed)
        self.fisher = f_r
        theta = self.index.gather(dict(self.model.named_parameters()))
        select = f_f > c.ssd_alpha * f_r
        factor = torch.where(select, (c.ssd_lambda * f_r / f_f.clamp(min=1e-30)).clamp(max=1.0), torch.ones_like(f_r))
        delta = theta * (factor - 1)
        self.proposal = delta.clone()
        self.priority = f_f
        return delta, {"loss": 0.0, "grad_norm": float(f_f.sum().sqrt()), "proj_removed_norm": 0.0,
                       "n_updated": int((delta != 0).sum())}


def rmu_layers(model) -> list[int]:
    """Three middle decoder layers (WMDP's choice, e.g. 5,6,7 of 32), or all there are on a shallow model."""
    n = model.config.num_hidden_layers
    if n <= 3:
        return list(range(n))
    mid = n // 2
    return [mid - 2, mid - 1, mid]


def method_index(model, config: UnlearnConfig, masks: dict[str, torch.Tensor] | None) -> ParamIndex:
    """The coordinates a method may update."""
    quant = quantizable_names(model)
    if config.method == "rmu":
        names = [n for n in quant if any(f".layers.{l}." in n for l in rmu_layers(model)) and "down_proj" in n]
        if not names:
            raise ValueError("RMU needs MLP down_proj weights (Llama-style names '...layers.N.mlp.down_proj.weight')")
        return index_from_masks(full_masks(model, names), model)
    if config.method in ("mansu", "mansu_no_floor", "mansu_no_fisher") and masks is not None:
        kept = {n: m for n, m in masks.items() if n in set(quant)}
        index = index_from_masks(kept, model)
        if index.numel == 0:
            raise EmptyCircuitError(f"empty circuit: its masks cover 0 quantizable weights ({len(masks)} masks, "
                                    f"{sum(int(m.sum()) for m in masks.values())} entries, none in the "
                                    f"{len(quant)} Linear weights NF4 quantizes); widen the circuit selection")
        return index
    return index_from_masks(full_masks(model, quant), model)


def build_method(model, forget, retain, config, index) -> Method:
    cls = {"rmu": Rmu, "ssd": Ssd}.get(config.method)
    if cls is None:
        cls = Mansu if config.method.startswith("mansu") else GradientBaseline
    return cls(model, forget, retain, config, index)


def run_unlearning(model, forget: TokenBatch, retain: TokenBatch, config: UnlearnConfig,
                   masks: dict[str, torch.Tensor] | None = None,
                   on_step: Callable[[dict], None] | None = None, cache: dict | None = None) -> UnlearnResult:
    """Unlearn in place (callers pass a copy); returns the cumulative update and per-step stats.

    `cache` (optional) shares base-weight statistics (retain Fisher/basis, NF4 geometry) between runs that start
    from the same base weights; pass a fresh dict per base."""
    index = method_index(model, config, masks)
    torch.manual_seed(config.seed)
    method = build_method(model, forget, retain, config, index)
    method.cache = cache
    t0 = time.perf_counter()
    method.prepare()
    prep = time.perf_counter() - t0
    total, steps = torch.zeros(index.numel), []
    for i in range(config.steps):
        t = time.perf_counter()
        delta, stats = method.step(i)
        apply_update(model, index, delta)
        total += delta
        record = {"step": i, "method": config.method, **stats, "update_norm": float(total.norm()),
                  "n_nonzero": int((total != 0).sum()), "step_seconds": round(time.perf_counter() - t, 4)}
        steps.append(record)
        if on_step:
            on_step(record)
    summary = {"prepare_seconds": round(prep, 3), "loop_seconds": round(time.perf_counter() - t0 - prep, 3),
               "n_coordinates": index.numel, "n_params_touched": int((total != 0).sum())}
    return UnlearnResult(index, total, steps, method.proposal, method.priority, method.fisher, summary)
