"""CAD split into shrinkage, reversal and rerouting, with paired bootstrap CIs (issue 13, item 3).

Over the original circuit's edges C, with s / t the mean edge scores before / after unlearning,
S = sum_C |s_e|, T = sum_C |t_e| and r = T / S:

    CAD         = sum_C |s_e - t_e| / (S + T)                       (mansu.attribution.cad)
    shrinkage   = |S - T| / (S + T) = |1 - r| / (1 + r)             CAD's lower bound; the CAD of t = r s exactly
    reversal    = CAD - CAD(sigma s, t),  sigma = -1 when sum_C |s_e + t_e| < sum_C |s_e - t_e|, else +1 (then 0)
    rerouting   = CAD(sigma s, t) - shrinkage                       >= 0, so CAD = shrinkage + reversal + rerouting
      sign_flip = sum_{C, sigma s_e t_e < 0} 2 min(|s_e|, |t_e|) / (S + T)   rerouting's part from edges that flipped
                  against the circuit's orientation (the rest: edges whose |score| moved against the net change)

Why `reversal` is apart: the metric is the answer's logit difference, so an output-level change that makes the
model prefer another answer (fine-tuning only the unembedding to avoid the answers) flips the sign of the metric
and with it of every edge score, through an unchanged circuit: on the demo model CAD was 1.000 with 0.83 of it sign
flips, but the edges flipped together (CAD(-s, t) small). A global flip is the readout reversed, not the circuit.

CAD reaches its bound whenever every edge keeps its orientation and none moves against the net change, however
unequal the shrinkage (zeroing the demo circuit's top 3 components: CAD 0.86, all of it "shrinkage"); so two
scale- and orientation-free measures say whether attribution *moved*, not merely shrank or reversed:

    redistribution = 1/2 sum_C |t_e / T - sigma s_e / S|  in [0, 1]: the share of the circuit's (signed, normalised)
                     attribution that changed edges; 0 for any rescaling t = +-r s
    outside_shift  = T_out / (T_out + T) - S_out / (S_out + S), X_out = sum_{e not in C} |x_e| over the graph's
                     other edges: the share of all attribution that moved out of the circuit (< 0: moved in)

    moved_beyond_noise = mean over random halves A, B of the examples of
                         1/2 [d(s_A, t_B) + d(s_B, t_A)] - d(t_A, t_B),  d = redistribution's profile distance
                     (pooled only): the move between before and after seen on different examples, less the
                     after graph's distance from itself. A shrunken after graph's profile is noisy, and
                     redistribution then reads the noise as a move (a bias, which no CI removes); this is <= 0
                     for noise and about the move for a reproducible one (docs/attribution.md: measurements).

Rule (mansu.scorecard): structural erasure needs more than shrinkage, i.e. the 95% CI low end of
moved_beyond_noise is at least `reroute_threshold` (default 0.30). Until 2026-12-01 it read redistribution or
outside_shift raw; at the runs' 120 records and 2 IG steps that passed a suppression (last layer + norm fine-tuned:
redistribution CI low 0.315), and on MANSU runs the after graph's split-half distance was as large as redistribution
(so the correction was decided after seeing those numbers; the threshold was not changed). At 120 records, 2 IG
steps, demo model 0 (`scripts/cad_cases.py --records 120 --ig-steps 2`): moved_beyond_noise CI low -0.29 / 0.14 /
-0.13 for the three fine-tunes, 0.37 for the zeroed components. History, stated plainly: the rule chosen before
any result was seen used redistribution *without* sigma and a threshold of 0.10; on the demo model fine-tuning
only the unembedding (a suppression) then scored redistribution 1.00, i.e. "erasure". sigma and 0.30 were set
after seeing these demo numbers (point values; 32 forget records, 8 IG steps):

    change to the demo model (forget accuracy after)     CAD    shrinkage  redistribution(sigma)  outside_shift
    answer-logit bias -30 (1.00 -> 0.03)                 0.00   0.00       0.00                   0.00
    unembedding fine-tuned, 5 Adam steps (-> 0.06)       1.00   0.04       0.15                   0.10
    last MLP fine-tuned (-> 0.03)                        1.00   0.31       0.23                   0.02
    last layer + final norm fine-tuned (-> 0.00)         1.00   0.25       0.25                   0.29
    top 3 circuit components zeroed (-> 0.84)            0.86   0.86       0.71                   0.47

so 0.30 separated these five cases on one model at 32 records (the raw measures; see above for 120 records).

Per fact (`split_parts`' second result: each part of each record's own s_i, t_i, averaged over records; the
scorecard's CAD threshold reads its CAD, mansu.attribution.cad): under a per-record rescaling t_i = r_i s_i its
redistribution is 0 where the pooled one is not (facts shrinking unequally change the mean graph's profile), but
on the same five cases (`python scripts/cad_cases.py`: 32 records, 8 IG steps, 500 draws; value [95% CI]) the
suppressions' per-fact redistribution (0.36-0.43) is where a MANSU run's is (0.36): per record, a changed readout
moves attribution among edges too. So the reroute evidence stays pooled:

    change                          CAD per fact          redistribution per fact   outside_shift per fact
    answer-logit bias -30           0.000                 0.000                     0.000
    unembedding fine-tuned          0.916 [0.866, 0.953]  0.393 [0.343, 0.439]      0.100 [0.070, 0.130]
    last MLP fine-tuned             0.963 [0.935, 0.984]  0.357 [0.318, 0.398]     -0.029 [-0.059, -0.006]
    last layer + norm fine-tuned    0.923 [0.876, 0.958]  0.431 [0.386, 0.480]      0.316 [0.278, 0.353]
    top 3 circuit components zeroed 0.841 [0.816, 0.871]  0.742 [0.717, 0.775]      0.485 [0.453, 0.517]
    (a MANSU run, 120 records, 2 steps: 0.575 [0.535, 0.617], redistribution 0.363 [0.330, 0.393])

CIs: percentile bootstrap over examples, the same paired draws (same seed, same chunks) as cad.py's CAD CI.
moved_beyond_noise's CI: each bootstrap draw cut into its own random halves (seeded); the drawn halves hold fewer
distinct examples, so the CI sits lower than the point (conservative). Its cost: four [B, E_C] float64 matmuls per
chunk of draws, and 256 splits for the point (the same size).
Memory beyond the [n, U, D] per-example scores: a float32 copy of the other edges' scores (4 B per example and
edge: 139 MB for 64 examples of a 543k-edge graph), per chunk of 256 resamples 256 x E_C float64 for s and t and
256 x 1024 float64 per block of the other edges (2 MiB); time 2 n_boot x n x (E_C + E_all) multiply-adds. Per
fact: n float64 per part, and while each example's outside |score| sum is taken a float64 copy of the other
edges' per-example scores (8 B per example and edge, transient; the pooled point estimate makes the same copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from mansu.attribution.circuit import Circuit, named_edge_indices
from mansu.attribution.eap import AttributionGraph
from mansu.scorecard import REROUTE_EVIDENCE, reroutes

__all__ = ["PARTS", "POOLED_ONLY", "REROUTE_EVIDENCE", "beyond_noise", "cad_parts", "draw_counts", "parts_of",
           "profile_distance", "random_halves", "reroutes", "split_parts"]

PARTS = ("cad", "shrinkage", "reversal", "rerouting", "sign_flip", "redistribution", "outside_shift")
POOLED_ONLY = ("moved_beyond_noise",)   # a split of the examples into halves: no per-record value
_EDGE_BLOCK = 1024
_CHUNK = 256


@dataclass(frozen=True)
class Part:
    value: float
    ci_low: float
    ci_high: float


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def parts_of(s: torch.Tensor, t: torch.Tensor, s_out: torch.Tensor, t_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every part (module docstring) of circuit scores s, t [..., E] and outside |score| sums s_out, t_out [...]."""
    big_s, big_t = s.abs().sum(-1), t.abs().sum(-1)
    den = big_s + big_t
    plus, minus = (s - t).abs().sum(-1), (s + t).abs().sum(-1)
    sigma = torch.where(minus < plus, -1.0, 1.0).to(s.dtype).unsqueeze(-1)    # the orientation closer to t
    aligned = sigma * s
    cad, cad_aligned = _safe_div(plus, den), _safe_div(torch.minimum(plus, minus), den)
    shrinkage = _safe_div((big_s - big_t).abs(), den)
    flips = torch.where(aligned * t < 0, 2 * torch.minimum(s.abs(), t.abs()), torch.zeros_like(s)).sum(-1)
    return {"cad": cad, "shrinkage": shrinkage, "reversal": cad - cad_aligned,
            "rerouting": (cad_aligned - shrinkage).clamp(min=0.0), "sign_flip": _safe_div(flips, den),
            "redistribution": profile_distance(s, t),
            "outside_shift": _safe_div(t_out, t_out + big_t) - _safe_div(s_out, s_out + big_s)}


def profile_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1/2 sum_e |t_e / T - sigma s_e / S| over the last dim (`redistribution`); 0 where a side vanished."""
    big_s, big_t = s.abs().sum(-1), t.abs().sum(-1)
    sigma = torch.where((s + t).abs().sum(-1) < (s - t).abs().sum(-1), -1.0, 1.0).to(s.dtype).unsqueeze(-1)
    profile = (_safe_div(t, big_t.unsqueeze(-1)) - _safe_div(sigma * s, big_s.unsqueeze(-1))).abs().sum(-1) / 2
    both = (big_s > 0) & (big_t > 0)                     # a vanished side has no profile to compare
    return torch.where(both, profile, torch.zeros_like(profile))


def beyond_noise(s_ex: torch.Tensor, t_ex: torch.Tensor, half: torch.Tensor,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
    """`moved_beyond_noise` (module docstring) per row of `half` [B, n] (True: example in half A), over the
    examples weighted by `counts` [B, n] (a bootstrap draw; default each example once): the profile distance
    across the halves (before of one, after of the other, both ways) minus the one between the after graph's
    own halves."""
    w = torch.ones(half.shape, dtype=s_ex.dtype) if counts is None else counts
    a, b = w * half, w * ~half
    s_a, s_b, t_a, t_b = a @ s_ex, b @ s_ex, a @ t_ex, b @ t_ex   # sums: a profile is scale-free
    across = (profile_distance(s_a, t_b) + profile_distance(s_b, t_a)) / 2
    return across - profile_distance(t_a, t_b)


def random_halves(n: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, n] bool, each row a uniformly random half of n examples (floor(n / 2) True)."""
    order = torch.rand(rows, n, generator=gen).argsort(-1)
    return order < n // 2


def _split_scores(graph: AttributionGraph, circuit: Circuit) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example scores [n, E_C] of the circuit's edges and [n, E_out] of the graph's other valid edges."""
    if graph.per_example is None:
        raise ValueError("the CAD split needs per-example edge scores: attribute(..., per_example=True)")
    us, vs = named_edge_indices(circuit.edges, graph)
    outside = graph.valid.clone()
    outside[us, vs] = False
    return graph.per_example[:, us, vs].double(), graph.per_example[:, outside]   # the many others stay float32


def _abs_sum(counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """sum_e |counts @ scores[:, e]| per resample [B], over blocks of edges (the 1/n of a mean cancels later)."""
    out = torch.zeros(counts.shape[0], dtype=torch.float64)
    for start in range(0, scores.shape[1], _EDGE_BLOCK):
        out += (counts @ scores[:, start:start + _EDGE_BLOCK].double()).abs_().sum(-1)
    return out


def draw_counts(n: int, n_boot: int, seed: int) -> Iterator[torch.Tensor]:
    """The paired bootstrap's draws, [B, n] counts of each example per resample, in chunks of _CHUNK resamples:
    one generator, so CAD, its split and the per-fact estimates all see the same resamples."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n_boot, _CHUNK):
        idx = torch.randint(0, n, (min(_CHUNK, n_boot - start), n), generator=gen)
        yield torch.zeros(idx.shape[0], n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(idx.shape, dtype=torch.float64))


def _resampled(s_ex, t_ex, s_out_ex, t_out_ex, per_fact: dict[str, torch.Tensor], n_boot: int,
               seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every part on each of n_boot paired resamples of the examples, pooled (with POOLED_ONLY) and per fact,
    {part: [n_boot]} each.  Each resample is cut into its own random halves for `moved_beyond_noise`."""
    n = s_ex.shape[0]
    halves = torch.Generator().manual_seed(seed + 1)
    pooled: dict[str, list[torch.Tensor]] = {p: [] for p in (*PARTS, *POOLED_ONLY)}
    facts: dict[str, list[torch.Tensor]] = {p: [] for p in PARTS}
    for counts in draw_counts(n, n_boot, seed):
        got = parts_of(counts @ s_ex, counts @ t_ex, _abs_sum(counts, s_out_ex), _abs_sum(counts, t_out_ex))
        got["moved_beyond_noise"] = beyond_noise(s_ex, t_ex, random_halves(n, counts.shape[0], halves), counts)
        for p in pooled:
            pooled[p].append(got[p])
        for p in PARTS:
            facts[p].append(counts @ per_fact[p] / n)
    return {p: torch.cat(v) for p, v in pooled.items()}, {p: torch.cat(v) for p, v in facts.items()}


def _interval(point: torch.Tensor, boots: torch.Tensor | None, level: float) -> dict[str, float]:
    if boots is None:
        return asdict(Part(float(point), float(point), float(point)))
    alpha = (1 - level) / 2
    return asdict(Part(float(point), float(torch.quantile(boots, alpha)), float(torch.quantile(boots, 1 - alpha))))


def split_parts(before: AttributionGraph, after: AttributionGraph, circuit: Circuit, *, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """({part: {value, ci_low, ci_high}} pooled, the same per fact) for every part of PARTS (module docstring);
    graphs as for `cad`."""
    s_ex, s_out_ex = _split_scores(before, circuit)
    t_ex, t_out_ex = _split_scores(after, circuit)
    point = parts_of(s_ex.mean(0), t_ex.mean(0), s_out_ex.double().mean(0).abs().sum(),
                     t_out_ex.double().mean(0).abs().sum())
    n = s_ex.shape[0]
    point["moved_beyond_noise"] = torch.tensor(0.0) if n < 2 else \
        beyond_noise(s_ex, t_ex, random_halves(n, _CHUNK, torch.Generator().manual_seed(seed + 2))).mean()
    per_fact = parts_of(s_ex, t_ex, s_out_ex.double().abs().sum(-1), t_out_ex.double().abs().sum(-1))   # [n] each
    boots, fact_boots = ({}, {}) if n_boot < 1 or s_ex.shape[0] < 2 else \
        _resampled(s_ex, t_ex, s_out_ex, t_out_ex, per_fact, n_boot, seed)
    return ({p: _interval(point[p], boots.get(p), level) for p in (*PARTS, *POOLED_ONLY)},
            {p: _interval(per_fact[p].mean(), fact_boots.get(p), level) for p in PARTS})


def cad_parts(before: AttributionGraph, after: AttributionGraph, circuit: Circuit, *, n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """{part: {value, ci_low, ci_high}} for every part of PARTS, pooled (module docstring)."""
    return split_parts(before, after, circuit, n_boot=n_boot, seed=seed, level=level)[0]
