"""NPO (Zhang et al. 2024) with a retain NLL term: -2/beta log sigmoid(-beta log(p_theta / p_ref)) on forget."""

from mansu.unlearn.methods.gradient import GradientMethod


class NPO(GradientMethod):
    name = "npo"
    summary = "negative preference optimisation + retain NLL"
    objective = "npo"
    retain_term = True
    fields = (*GradientMethod.fields, "beta", "retain_weight")
    # the held-out rule (docs/demo_search.md section 6): the smallest lr that forgets >= half the headroom in fp
    # on demo model seed 3; 1e-4 forgot 0.43 there
    demo = {"steps": 20, "lr": 3e-4}
