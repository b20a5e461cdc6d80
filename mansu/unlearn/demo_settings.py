"""The unlearning settings used on the demo world, per method: one source for `python -m mansu compare` (the
generated docs/results.md) and the app's "Build and run the demo" button, so both show the same methods."""

from __future__ import annotations

# Demo-world settings per method (Adam learning rates from SPEC.md's measurements; MANSU moves whole bins).
DEMO_SETTINGS: dict[str, dict] = {
    # Every method gets 20 steps. docs/demo_search.md: the retain term keeps MANSU's retain accuracy.
    "mansu": {"steps": 20, "mansu_retain_weight": 1.0},
    "mansu_no_floor": {"steps": 20, "lr": 3e-5, "mansu_retain_weight": 1.0},
    "mansu_no_circuit": {"steps": 20, "mansu_retain_weight": 1.0},
    "mansu_no_fisher": {"steps": 20, "mansu_retain_weight": 1.0},
    "ga": {"steps": 20, "lr": 1e-5},
    "graddiff": {"steps": 20, "lr": 3e-5},
    "npo": {"steps": 20, "lr": 3e-5},
    "simnpo": {"steps": 20, "lr": 3e-5},
    "rmu": {"steps": 20, "lr": 5e-5},
    "sure": {"steps": 20, "sure_lr": 1e-4, "retain_weight": 2.0},
    "gu": {"steps": 20, "lr": 3e-5},
    "ssd": {"steps": 1},
}
COMMON = {"n_fisher": 32, "k": 8, "batch_size": 32}


def demo_settings(method: str) -> dict:
    """The demo-world settings of one method (COMMON, then the method's own); a fresh dict each call."""
    if method not in DEMO_SETTINGS:
        raise ValueError(f"unknown method {method!r}; accepted are {', '.join(DEMO_SETTINGS)}")
    return {**COMMON, **DEMO_SETTINGS[method]}
