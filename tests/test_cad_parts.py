"""CAD's split into shrinkage and rerouting (mansu.attribution.cad_parts) on hand-built graphs whose answers are
known, and the CI width of the CAD estimator on a fixed case."""

from __future__ import annotations

import pytest
import torch

from mansu.attribution.cad import cad
from mansu.attribution.cad_parts import POOLED_ONLY, beyond_noise, cad_parts, profile_distance, random_halves, reroutes
from mansu.attribution.circuit import Circuit
from mansu.attribution.eap import AttributionGraph

NAMES = (["input", "a0.h0", "m0"], ["a0.h0", "m0", "logits"])
CIRCUIT = Circuit([("input", "a0.h0"), ("a0.h0", "m0"), ("m0", "logits")])   # 3 of the 9 edges


def _graph(per_example: torch.Tensor) -> AttributionGraph:
    n = per_example.shape[0]
    valid = torch.ones(per_example.shape[1:], dtype=torch.bool)
    return AttributionGraph(NAMES[0], NAMES[1], per_example.mean(0), valid, torch.zeros(n), torch.zeros(n),
                            per_example, {"record_indices": list(range(n)), "metric": "logit_diff",
                                          "corruption": "counterfactual"})


def _scores(circuit_values: list[float], outside: float = 0.1, n: int = 16, noise: float = 0.0,
            seed: int = 0) -> torch.Tensor:
    """[n, 3, 3] per-example scores: the circuit's three edges at `circuit_values`, the other six at `outside`."""
    mean = torch.full((3, 3), outside)
    for (u, v), x in zip(CIRCUIT.edges, circuit_values):
        mean[NAMES[0].index(u), NAMES[1].index(v)] = x
    gen = torch.Generator().manual_seed(seed)
    return mean + noise * torch.randn(n, 3, 3, generator=gen)


def _values(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    return {k: v["value"] for k, v in cad_parts(_graph(before), _graph(after), CIRCUIT, n_boot=0).items()}


def test_uniform_shrinkage_is_all_shrinkage():
    s = _scores([1.0, 2.0, -3.0])
    p = _values(s, s / 10)
    assert p["cad"] == pytest.approx(0.9 / 1.1) and p["shrinkage"] == pytest.approx(p["cad"])
    assert p["rerouting"] == pytest.approx(0.0, abs=1e-6) and p["redistribution"] == pytest.approx(0.0, abs=1e-6)


def test_unequal_shrinkage_reaches_the_bound_but_is_redistribution():
    # one edge vanishes, the others stay: CAD equals its shrinkage bound, yet half the attribution moved
    p = _values(_scores([1.0, 1.0, 0.0]), _scores([0.0, 1.0, 0.0]))
    assert p["cad"] == pytest.approx(1 / 3) and p["rerouting"] == pytest.approx(0.0, abs=1e-6)
    assert p["redistribution"] == pytest.approx(0.5)


def test_a_global_flip_is_reversal_and_one_edges_flip_is_rerouting():
    s = _scores([1.0, 2.0, -3.0])
    p = _values(s, -s)                                  # the readout reversed: every edge flips together
    assert p["cad"] == pytest.approx(1.0) and p["reversal"] == pytest.approx(1.0)
    assert p["rerouting"] == pytest.approx(0.0, abs=1e-6) and p["redistribution"] == pytest.approx(0.0, abs=1e-6)
    p = _values(s, _scores([-1.0, 2.0, -3.0]))        # one edge of |score| 1 flips against the other five
    assert p["reversal"] == 0.0 and p["shrinkage"] == pytest.approx(0.0, abs=1e-6)
    assert p["rerouting"] == pytest.approx(2 / 12) and p["sign_flip"] == pytest.approx(2 / 12)
    assert p["redistribution"] == pytest.approx(1 / 6)


def test_attribution_moving_out_of_the_circuit():
    before, after = _scores([1.0, 1.0, 1.0], outside=0.0), _scores([1.0, 1.0, 1.0], outside=0.5)
    p = _values(before, after)
    assert p["cad"] == pytest.approx(0.0) and p["outside_shift"] == pytest.approx(3.0 / 6.0)
    assert _values(after, before)["outside_shift"] == pytest.approx(-0.5)


def test_split_adds_up_and_shares_cads_draws():
    before, after = _scores([1.0, 2.0, -3.0], noise=0.5), _scores([0.2, 1.5, 1.0], noise=0.5, seed=1)
    r = cad(_graph(before), _graph(after), CIRCUIT, n_boot=400)
    parts = r.parts
    assert parts["cad"]["value"] == pytest.approx(r.value)
    assert (parts["cad"]["ci_low"], parts["cad"]["ci_high"]) == pytest.approx((r.ci_low, r.ci_high))
    split = parts["shrinkage"]["value"] + parts["reversal"]["value"] + parts["rerouting"]["value"]
    assert split == pytest.approx(r.value)
    assert parts["sign_flip"]["value"] <= parts["rerouting"]["value"] + 1e-12
    for name, p in parts.items():   # moved_beyond_noise's resampled halves are noisier: its CI sits low
        assert p["ci_low"] <= p["value"] <= p["ci_high"] or name in POOLED_ONLY and p["ci_low"] <= p["value"]


def _wide_graph(per_example: torch.Tensor) -> AttributionGraph:
    """An 8 x 8 graph of per-example scores [n, 8, 8] (every edge valid); WIDE_CIRCUIT holds 48 of its edges."""
    n = per_example.shape[0]
    return AttributionGraph(WIDE[0], WIDE[1], per_example.mean(0), torch.ones(8, 8, dtype=torch.bool),
                            torch.zeros(n), torch.zeros(n), per_example, {"record_indices": list(range(n))})


WIDE = ([f"u{i}" for i in range(8)], [f"v{i}" for i in range(8)])
WIDE_CIRCUIT = Circuit([(u, v) for u in WIDE[0] for v in WIDE[1]][:48])


@pytest.mark.parametrize("seed", [0, 1])
def test_a_shrunken_noisy_graph_moved_nothing_beyond_its_noise(seed):
    # after: the same profile at 5% of its size under per-example noise, as a forget circuit looks once its
    # answers are gone (demo MANSU runs: after/before attribution 0.04-0.15). The raw profile distance reads the
    # noise as a move; the split-half correction does not
    gen = torch.Generator().manual_seed(seed)
    profile = 1 + 2 * torch.rand(8, 8, generator=gen)
    before = profile + 0.1 * torch.randn(120, 8, 8, generator=gen)
    after = 0.05 * profile + 0.5 * torch.randn(120, 8, 8, generator=gen)
    p = cad_parts(_wide_graph(before), _wide_graph(after), WIDE_CIRCUIT, n_boot=500)
    assert p["redistribution"]["ci_low"] > 0.15
    assert p["moved_beyond_noise"]["ci_high"] < 0.05 and reroutes(p, 0.3) is False


@pytest.mark.parametrize("seed", [0, 1])
def test_a_real_move_survives_the_noise_correction(seed):
    # after: half of the circuit's edges fade to 5% (the attribution moved onto the rest), little noise
    gen = torch.Generator().manual_seed(seed)
    profile = 1 + 2 * torch.rand(8, 8, generator=gen)
    faded = profile.clone().reshape(-1)
    faded[:24] *= 0.05
    before = profile + 0.1 * torch.randn(120, 8, 8, generator=gen)
    after = 0.3 * faded.reshape(8, 8) + 0.1 * torch.randn(120, 8, 8, generator=gen)
    p = cad_parts(_wide_graph(before), _wide_graph(after), WIDE_CIRCUIT, n_boot=500)
    moved = p["moved_beyond_noise"]
    assert moved["ci_low"] >= 0.35 and moved["value"] == pytest.approx(p["redistribution"]["value"], abs=0.05)
    assert reroutes(p, 0.3) is True


def test_moved_beyond_noise_is_zero_for_a_noiseless_rescaling():
    s = _scores([1.0, 2.0, -3.0], n=16)
    p = cad_parts(_graph(s), _graph(s / 10), CIRCUIT, n_boot=200)["moved_beyond_noise"]
    assert max(abs(p["value"]), abs(p["ci_low"]), abs(p["ci_high"])) < 1e-6


def test_beyond_noise_by_hand():
    # two examples per half, one split: across = mean of the two cross distances, minus the after halves' own
    s_ex = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t_ex = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    half = torch.tensor([[True, True, False, False]])
    # t_A = (2, 2): profile (.5, .5); t_B = (0, 2): (0, 1); s halves (1, 0)
    # across = (|.5-1| + |.5-0| + |0-1| + |1-0|) / 2 / 2 = (0.5 + 1) / 2; within = (|.5-0| + |.5-1|) / 2 = 0.5
    assert float(beyond_noise(s_ex, t_ex, half)[0]) == pytest.approx(0.75 - 0.5)
    assert float(profile_distance(s_ex[0], -s_ex[0])) == 0.0       # sigma: a global flip is not a move
    halves = random_halves(7, 5, torch.Generator().manual_seed(0))
    assert halves.shape == (5, 7) and halves.sum(-1).tolist() == [3] * 5


def test_reroute_rule_reads_ci_low_ends():
    moved = {"moved_beyond_noise": {"value": 0.3, "ci_low": 0.2, "ci_high": 0.4},
             "redistribution": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7}}   # raw: not read
    assert reroutes(moved, 0.1) is True
    assert reroutes(moved, 0.25) is False                       # the point estimate alone is not enough
    assert reroutes({}, 0.1) is None


def test_cad_ci_width_on_a_fixed_case():
    # 64 examples, per-example noise 0.5 on edges of size 1-3: the 95% CI half-width is a few hundredths (0.037
    # measured); a change in the bootstrap (fewer draws, unpaired resampling) would widen or break it
    before, after = _scores([1.0, 2.0, -3.0], n=64, noise=0.5), _scores([0.5, 1.0, -1.5], n=64, noise=0.5, seed=1)
    r = cad(_graph(before), _graph(after), CIRCUIT, n_boot=1000)
    half = (r.ci_high - r.ci_low) / 2
    assert 0.005 < half <= 0.05, half
    assert r.ci_low <= r.value <= r.ci_high


def test_per_fact_cad_is_the_mean_of_each_records_cad():
    before, after = _scores([1.0, 2.0, -3.0], noise=0.5), _scores([0.2, 1.5, 1.0], noise=0.5, seed=1)
    r = cad(_graph(before), _graph(after), CIRCUIT, n_boot=400)
    idx = [(NAMES[0].index(u), NAMES[1].index(v)) for u, v in CIRCUIT.edges]
    by_hand = [sum(abs(b[i][j] - a[i][j]) for i, j in idx) / sum(abs(b[i][j]) + abs(a[i][j]) for i, j in idx)
               for b, a in zip(before.tolist(), after.tolist())]
    fact = r.per_fact
    assert fact["cad"]["value"] == pytest.approx(sum(by_hand) / len(by_hand))
    split = fact["shrinkage"]["value"] + fact["reversal"]["value"] + fact["rerouting"]["value"]
    assert split == pytest.approx(fact["cad"]["value"])          # each record's split adds up, so their means do
    for p in fact.values():
        assert p["ci_low"] <= p["value"] <= p["ci_high"]


def test_per_fact_split_sees_per_record_rescaling_as_shrinkage():
    # each record's circuit shrinks by its own factor: the mean graph's profile changes (pooled redistribution > 0)
    # but no record's attribution moved (per fact: none)
    before = _scores([1.0, 2.0, -3.0], n=8)
    before[:4, 0, 0] = 3.0                                       # half the records lean on input->a0.h0
    factors = torch.tensor([0.1] * 4 + [1.0] * 4).view(-1, 1, 1)
    r = cad(_graph(before), _graph(before * factors), CIRCUIT, n_boot=0)
    assert r.parts["redistribution"]["value"] > 0.05
    assert r.per_fact["redistribution"]["value"] == pytest.approx(0.0, abs=1e-6)   # float32 scores
    assert r.per_fact["rerouting"]["value"] == pytest.approx(0.0, abs=1e-6)


def test_per_fact_cad_ci_width_on_a_fixed_case():
    # 120 records (the demo's forget set) each shrinking by its own factor, 0.1 to 1: each record's CAD spreads
    # over 0-0.82 (sd ~0.24, as on a MANSU run of the demo), and the per-fact CI half-width is ~0.04 (the
    # paired draw of the records' own CADs); 64 records give ~0.056
    before = _scores([1.0, 2.0, -3.0], n=120, noise=0.5)
    after = before * torch.linspace(0.1, 1.0, 120).view(-1, 1, 1)
    r = cad(_graph(before), _graph(after), CIRCUIT, n_boot=1000)
    half = (r.per_fact["cad"]["ci_high"] - r.per_fact["cad"]["ci_low"]) / 2
    assert 0.005 < half <= 0.05, half
