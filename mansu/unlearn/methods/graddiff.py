"""GradDiff: gradient ascent on forget plus descent on retain (retain_weight)."""

from mansu.unlearn.methods.gradient import GradientMethod


class GradDiff(GradientMethod):
    name = "graddiff"
    summary = "gradient ascent on forget + descent on retain"
    objective = "ga"
    retain_term = True
    fields = (*GradientMethod.fields, "retain_weight")
    demo = {"steps": 20, "lr": 1e-4}
