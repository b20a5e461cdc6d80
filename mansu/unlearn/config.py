"""The unlearning configuration: one typed dataclass, validated in `__post_init__` before any work starts.

Every method (MANSU, its ablations and the baselines) reads the same config; fields a method does not use are
ignored by it and recorded anyway, so a run's config.json says exactly what was asked.  Each field carries its
help text and range (mansu/options.py): the CLI's `run` flags and the app's form are generated from them, and
each method class lists the fields it reads (`Method.fields`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from mansu.options import from_dict, opt, validate
from mansu.quant.alignment import parse_quantizers
from mansu.quant.registry import QUANTIZERS

Objective = Literal["npo", "ga"]
Optimizer = Literal["adam", "sgd"]
Selection = Literal["gradient", "fisher_ratio"]
FisherMode = Literal["scale", "clip"]
MAX_SEED = 2**32 - 1  # torch.manual_seed and numpy accept up to this


@dataclass(frozen=True)
class UnlearnConfig:
    method: str = opt("mansu", "unlearning method (mansu.unlearn.methods.METHODS)", flag=False)
    steps: int = opt(8, "optimisation steps (MANSU needs few: each step moves whole bins)", lo=1, hi=100_000)
    lr: float = opt(3e-5, "learning rate (baselines; MANSU's proposal scale)", lo=0.0, hi=10.0, lo_open=True)
    optimizer: Optimizer = opt("adam", "baselines' optimizer; MANSU's magnitude comes from the floor")
    batch_size: int = opt(32, "forget (and retain) sequences per step", lo=1, hi=65_536)
    seed: int = opt(0, "random seed (batch order, retain sample, RMU direction)", lo=0, hi=MAX_SEED)
    objective: Objective = opt("npo", "forget objective of MANSU and GU: npo or ga")
    beta: float = opt(0.1, "NPO / SimNPO inverse temperature (Zhang et al. 2024 use 0.1)", lo=0.0, hi=100.0,
                      lo_open=True)
    simnpo_gamma: float = opt(0.0, "SimNPO reward margin", lo=-100.0, hi=100.0)
    retain_weight: float = opt(1.0, "weight of the retain NLL in GradDiff / NPO / SimNPO / SURE (SURE's alpha)",
                               lo=0.0, hi=1e6)
    # MANSU
    k: int = opt(16, "per-example retain gradients spanning the projected-out subspace", lo=1, hi=4096)
    n_fisher: int = opt(64, "retain examples for the diagonal Fisher", lo=1, hi=100_000)
    epsilon: float = opt(0.05, "Fisher budget: 1/2 sum F_i delta_i^2 <= epsilon (nats of retain NLL; inf: none)",
                         lo=0.0, lo_open=True)
    kappa: float = opt(1.0, "floor: |delta_i| >= kappa * NF4 bin width (1.0 = one whole cell)", lo=0.0, hi=16.0,
                       lo_open=True)
    update_fraction: float = opt(0.002, "MANSU candidates per step, as a fraction of the circuit's parameters",
                                 lo=0.0, hi=1.0, lo_open=True)
    blocksize: int = opt(64, "NF4 block size the floor targets (bitsandbytes' default 64; even)", lo=2, hi=4096)
    floor_quantizers: str = opt("nf4", "grids the floor targets: each floored weight changes its level under every "
                                       f"one (comma-separated among {', '.join(QUANTIZERS)})")
    mansu_retain_weight: float = opt(0.0, "MANSU: add w * retain-NLL gradient (a retain batch) before projecting",
                                     lo=0.0, hi=1e6)
    selection: Selection = opt("gradient", "MANSU candidate score: |p_i| or |p_i| / sqrt(F_i + damping)")
    fisher_damping: float = opt(1.0, "fisher_ratio damping, in units of mean(F) (near 0 picks dead weights)",
                                lo=0.0, hi=1e6, lo_open=True)
    fisher_mode: FisherMode = opt("scale", "how the bound is enforced on dense updates (no-floor ablation)")
    # RMU (Li et al. 2024, WMDP)
    rmu_steering: float = opt(6.5, "RMU steering coefficient c (WMDP: 6.5 for zephyr)", lo=0.0, hi=1e4, lo_open=True)
    rmu_alpha: float = opt(1200.0, "RMU retain weight alpha (WMDP's reference value)", lo=0.0, hi=1e6)
    # SURE (Zhang et al. 2024, quantization paper)
    sure_percentile: float = opt(90.0, "SURE: keep weight rows whose forget-gradient norm is >= this percentile",
                                 lo=0.0, hi=100.0, hi_open=True)
    sure_lr: float = opt(1e-4, "SURE's large learning rate", lo=0.0, hi=10.0, lo_open=True)
    # SSD (Foster et al. 2024)
    ssd_alpha: float = opt(10.0, "SSD selection: dampen where F_forget > alpha * F_retain", lo=0.0, hi=1e6,
                           lo_open=True)
    ssd_lambda: float = opt(1.0, "SSD dampening: theta *= min(lambda * F_retain / F_forget, 1)", lo=0.0, hi=1e6,
                            lo_open=True)

    def __post_init__(self) -> None:
        from mansu.unlearn.methods import method_class  # the registry imports this module

        method_class(self.method)
        if isinstance(self.floor_quantizers, (tuple, list)):  # a sequence of names is accepted in Python and JSON
            object.__setattr__(self, "floor_quantizers", ",".join(map(str, self.floor_quantizers)))
        validate(self)
        try:  # canonical form (no spaces or repeats), so that the cache and config.json see one spelling
            object.__setattr__(self, "floor_quantizers", ",".join(parse_quantizers(self.floor_quantizers)))
        except ValueError as e:
            raise ValueError(f"floor_quantizers: {e}") from None
        if self.blocksize % 2:
            raise ValueError(f"blocksize must be even (e.g. 64), got {self.blocksize}")
        if self.epsilon != math.inf and not math.isfinite(self.epsilon):
            raise ValueError(f"epsilon must be a positive number or inf, got {self.epsilon!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnlearnConfig:
        return from_dict(cls, data, "unlearning")
