"""SimNPO: reference-free NPO on length-normalised log-likelihood with a reward margin, plus retain NLL."""

from mansu.unlearn.methods.gradient import GradientMethod


class SimNPO(GradientMethod):
    name = "simnpo"
    summary = "reference-free NPO (length-normalised, margin gamma) + retain NLL"
    objective = "simnpo"
    retain_term = True
    fields = (*GradientMethod.fields, "beta", "simnpo_gamma", "retain_weight")
    demo = {"steps": 20, "lr": 1e-4}
