"""The unlearning settings used on the demo world, per method: one source for `python -m mansu compare` (the
generated docs/results.md) and the app's "Build and run the demo" button, so both show the same methods."""

from __future__ import annotations

# Demo-world settings per method. Every method gets 20 steps. Learning rates follow one rule, applied on seed 0
# of the NF4-grid base (docs/demo_search.md, section 1b): the smallest lr of the grid 1e-5, 3e-5, 1e-4, 3e-4, 1e-3
# whose full-precision forget accuracy drops by >= 0.2 (the scorecard's "meaningful forgetting"), so that every
# baseline really forgets before NF4 is applied. RMU (untuned) and SSD (one shot) are outside the rule.
# MANSU has no learning rate: the floor sets its moves; the retain term keeps its retain accuracy (section 2).
DEMO_SETTINGS: dict[str, dict] = {
    "mansu": {"steps": 20, "mansu_retain_weight": 1.0},
    "mansu_no_floor": {"steps": 20, "lr": 3e-4, "mansu_retain_weight": 1.0},
    "mansu_no_circuit": {"steps": 20, "mansu_retain_weight": 1.0},
    "mansu_no_fisher": {"steps": 20, "mansu_retain_weight": 1.0},
    "ga": {"steps": 20, "lr": 1e-4},
    "graddiff": {"steps": 20, "lr": 1e-4},
    "npo": {"steps": 20, "lr": 1e-4},
    "simnpo": {"steps": 20, "lr": 1e-4},
    "rmu": {"steps": 20, "lr": 5e-5},
    "sure": {"steps": 20, "sure_lr": 1e-3, "retain_weight": 2.0},
    "gu": {"steps": 20, "lr": 1e-4},
    "ssd": {"steps": 1},
}
COMMON = {"n_fisher": 32, "k": 8, "batch_size": 32}


def demo_settings(method: str) -> dict:
    """The demo-world settings of one method (COMMON, then the method's own); a fresh dict each call."""
    if method not in DEMO_SETTINGS:
        raise ValueError(f"unknown method {method!r}; accepted are {', '.join(DEMO_SETTINGS)}")
    return {**COMMON, **DEMO_SETTINGS[method]}
