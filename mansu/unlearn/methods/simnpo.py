"""SimNPO: reference-free NPO on length-normalised log-likelihood with a reward margin, plus retain NLL."""

from mansu.unlearn.methods.gradient import GradientMethod


class SimNPO(GradientMethod):
    name = "simnpo"
    summary = "reference-free NPO (length-normalised, margin gamma) + retain NLL"
    objective = "simnpo"
    retain_term = True
    fields = (*GradientMethod.fields, "beta", "simnpo_gamma", "retain_weight")
    # the held-out rule (docs/demo_search.md section 6): the smallest lr that forgets >= half the headroom in fp
    # on demo model seed 3; 1e-4 forgot 0.43 there
    demo = {"steps": 20, "lr": 3e-4}
