"""The unlearning configuration: one dataclass, validated in `__post_init__` before any work starts.

Every method (MANSU, its ablations and the baselines) reads the same config; fields a method does not use
are ignored by it and recorded anyway, so a run's config.json says exactly what was asked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Method = Literal["mansu", "mansu_no_floor", "mansu_no_circuit", "mansu_no_fisher", "ga", "graddiff", "npo",
                 "simnpo", "rmu", "sure", "gu", "ssd"]
METHODS: tuple[str, ...] = ("mansu", "mansu_no_floor", "mansu_no_circuit", "mansu_no_fisher", "ga", "graddiff",
                            "npo", "simnpo", "rmu", "sure", "gu", "ssd")
Objective = Literal["npo", "ga"]
OBJECTIVES = ("npo", "ga")
Optimizer = Literal["adam", "sgd"]
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class UnlearnConfig:
    method: str = "mansu"
    steps: int = 8                  # optimisation steps (the demo needs few: each MANSU step moves whole bins)
    lr: float = 3e-5                # gradient baselines: Adam at 1e-5..3e-5 forgets the demo in tens of steps
    optimizer: str = "adam"         # baselines' optimizer; MANSU's magnitude comes from the floor, not the lr
    batch_size: int = 32            # forget (and retain) sequences per step
    seed: int = 0
    objective: str = "npo"          # MANSU's forget objective (NPO or GA)
    beta: float = 0.1               # NPO / SimNPO inverse temperature (Zhang et al. 2024 use 0.1)
    simnpo_gamma: float = 0.0       # SimNPO reward margin
    retain_weight: float = 1.0      # weight of the retain NLL in GradDiff / NPO+retain / SURE (SURE's alpha)
    # MANSU
    k: int = 16                     # per-example retain gradients spanning the projected-out subspace
    n_fisher: int = 64              # retain examples for the diagonal Fisher
    epsilon: float = 0.05           # Fisher budget: 1/2 sum F_i delta_i^2 <= epsilon (nats of retain NLL, 2nd order)
    kappa: float = 1.0              # floor: |delta_i| >= kappa * NF4 bin width (1.0 = one whole cell)
    update_fraction: float = 0.002  # MANSU: candidates per step, as a fraction of the circuit's parameters
    blocksize: int = 64             # NF4 block size the floor targets (bitsandbytes' default)
    mansu_retain_weight: float = 0.0  # MANSU: add w * retain-NLL gradient (a retain batch) before projecting
    selection: str = "gradient"     # MANSU candidate score: gradient |p_i| or fisher_ratio |p_i| / sqrt(F_i + damping)
    fisher_damping: float = 1.0     # fisher_ratio damping, in units of mean(F) (near 0 picks dead weights: SPEC.md)
    fisher_mode: str = "scale"      # how the bound is enforced on dense updates (no-floor ablation, GU): scale|clip
    # RMU (Li et al. 2024, WMDP)
    rmu_steering: float = 6.5       # steering coefficient c (WMDP uses 6.5 for zephyr; scaled by hidden norm)
    rmu_alpha: float = 1200.0       # retain weight alpha (WMDP's reference value)
    # SURE (Zhang et al. 2024, quantization paper)
    sure_percentile: float = 90.0   # keep neurons (weight rows) whose forget-gradient norm is >= this percentile
    sure_lr: float = 1e-4           # SURE's large learning rate
    # SSD (Foster et al. 2024)
    ssd_alpha: float = 10.0         # selection: dampen where F_forget > alpha * F_retain
    ssd_lambda: float = 1.0         # dampening: theta *= min(lambda * F_retain / F_forget, 1)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("objective", self.objective, OBJECTIVES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("selection", self.selection, ("gradient", "fisher_ratio"))
        _float_range("mansu_retain_weight", self.mansu_retain_weight, 0.0, 1e6)
        _float_range("fisher_damping", self.fisher_damping, 0.0, 1e6, lo_open=True)
        _one_of("fisher_mode", self.fisher_mode, ("scale", "clip"))
        _int_range("steps", self.steps, 1, 100_000)
        _int_range("batch_size", self.batch_size, 1, 65_536)
        _int_range("k", self.k, 1, 4096)
        _int_range("n_fisher", self.n_fisher, 1, 100_000)
        _int_range("blocksize", self.blocksize, 2, 4096)
        if self.blocksize % 2:
            raise ValueError(f"blocksize must be even (e.g. 64), got {self.blocksize}")
        _float_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        _float_range("sure_lr", self.sure_lr, 0.0, 10.0, lo_open=True)
        _float_range("beta", self.beta, 0.0, 100.0, lo_open=True)
        _float_range("simnpo_gamma", self.simnpo_gamma, -100.0, 100.0)
        _float_range("retain_weight", self.retain_weight, 0.0, 1e6)
        _float_range("epsilon", self.epsilon, 0.0, math.inf, lo_open=True, hi_closed=True)
        _float_range("kappa", self.kappa, 0.0, 16.0, lo_open=True)
        _float_range("update_fraction", self.update_fraction, 0.0, 1.0, lo_open=True, hi_closed=True)
        _float_range("rmu_steering", self.rmu_steering, 0.0, 1e4, lo_open=True)
        _float_range("rmu_alpha", self.rmu_alpha, 0.0, 1e6)
        _float_range("sure_percentile", self.sure_percentile, 0.0, 100.0, hi_closed=False)
        _float_range("ssd_alpha", self.ssd_alpha, 0.0, 1e6, lo_open=True)
        _float_range("ssd_lambda", self.ssd_lambda, 0.0, 1e6, lo_open=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnlearnConfig":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown unlearning setting(s) {unknown}; accepted are {sorted(names)}")
        return cls(**data)


def _one_of(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} {value!r} is not supported; accepted are {', '.join(accepted)}")


def _int_range(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _float_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_closed: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value <= hi if hi_closed else value < hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), ("]" if hi_closed else ")")
        raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")
