"""The unlearning settings used on the demo world: one source for `mansu run --demo`, `mansu compare` (the
generated docs/results.md) and the app's "Build and run the demo" button, so all three give the same runs.

Each method's own settings live on its class (`Method.demo`, in mansu/unlearn/methods/).  They are chosen by
rules written down before the runs that apply them, on a held-out demo model (training seed 3, unlearning seed 0,
NF4-grid base; docs/demo_search.md section 6), never on the reported models (seeds 0-2):

    gradient baselines (ga, gu, graddiff, npo, simnpo), 20 steps: the smallest lr of the grid 1e-5, 3e-5, 1e-4,
        3e-4, 1e-3 whose full-precision run passes the scorecard's forgetting (>= half the base's above-chance
        forget accuracy removed), so that every baseline really forgets before NF4 is applied
    MANSU (and its ablations): the smallest update_fraction of {0.002, 0.004, 0.008, 0.016}, then the fewest steps
        of {20, 40}, whose forget accuracy is <= 0.35 in fp and after NF4 with the retain property passing

RMU (WMDP's coefficients scaled to the demo), SSD (one shot) and SURE are outside the rules.
"""

from __future__ import annotations

from mansu.unlearn.methods import method_class

COMMON = {"n_fisher": 32, "k": 8, "batch_size": 32}
DEMO_ALIGNMENT = "nf4-grid"  # the base where SPEC.md measured the dual failure (docs/results.md)
# CAD on the demo: all 120 forget records at 2 IG steps (per-fact CAD's 95% CI about +-0.04; mansu.attribution.cad)
DEMO_ATTRIBUTION = {"attribution_records": 120, "ig_steps": 2}


def demo_settings(method: str) -> dict:
    """The demo-world settings of one method (COMMON, then the method's own); a fresh dict each call."""
    return {**COMMON, **method_class(method).demo}
