"""The unlearning settings used on the demo world: one source for `mansu run --demo`, `mansu compare` (the
generated docs/results.md) and the app's "Build and run the demo" button, so all three give the same runs.

Each method's own settings live on its class (`Method.demo`, in mansu/unlearn/methods/).  Every method gets 20
steps. Learning rates follow one rule, applied on seed 0 of the NF4-grid base (docs/demo_search.md, section 1b):
the smallest lr of the grid 1e-5, 3e-5, 1e-4, 3e-4, 1e-3 whose full-precision forget accuracy drops by >= 0.2
(the scorecard's "meaningful forgetting"), so that every baseline really forgets before NF4 is applied.  RMU
(untuned) and SSD (one shot) are outside the rule.
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
