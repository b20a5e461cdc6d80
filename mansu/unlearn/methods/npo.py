"""NPO (Zhang et al. 2024) with a retain NLL term: -2/beta log sigmoid(-beta log(p_theta / p_ref)) on forget."""

from mansu.unlearn.methods.gradient import GradientMethod


class NPO(GradientMethod):
    name = "npo"
    summary = "negative preference optimisation + retain NLL"
    objective = "npo"
    retain_term = True
    fields = (*GradientMethod.fields, "beta", "retain_weight")
    demo = {"steps": 20, "lr": 1e-4}
