"""Gradient ascent on the forget set's NLL."""

from mansu.unlearn.methods.gradient import GradientMethod


class GA(GradientMethod):
    name = "ga"
    summary = "gradient ascent on the forget NLL"
    objective = "ga"
    # the held-out rule (docs/demo_search.md section 6) keeps 1e-4: the smallest lr forgetting >= half the
    # headroom in fp on demo model seed 3 (0.54; 3e-5: 0.16)
    demo = {"steps": 20, "lr": 1e-4}
