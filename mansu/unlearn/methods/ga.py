"""Gradient ascent on the forget set's NLL."""

from mansu.unlearn.methods.gradient import GradientMethod


class GA(GradientMethod):
    name = "ga"
    summary = "gradient ascent on the forget NLL"
    objective = "ga"
    demo = {"steps": 20, "lr": 1e-4}
