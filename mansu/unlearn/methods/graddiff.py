"""GradDiff: gradient ascent on forget plus descent on retain (retain_weight)."""

from mansu.unlearn.methods.gradient import GradientMethod


class GradDiff(GradientMethod):
    name = "graddiff"
    summary = "gradient ascent on forget + descent on retain"
    objective = "ga"
    retain_term = True
    fields = (*GradientMethod.fields, "retain_weight")
    # the held-out rule (docs/demo_search.md section 6): the smallest lr that forgets >= half the headroom in fp
    # on demo model seed 3; 1e-4 forgot 0.42 there
    demo = {"steps": 20, "lr": 3e-4}
