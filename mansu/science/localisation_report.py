"""docs/localisation.md from a localisation sweep (mansu.science.localisation): the rules, one table (mean ± sd over
seeds and each scorecard property's pass count), the per-run numbers, the figure (PNG and SVG), the JSON of the
points and the verdict on Guo et al. (ICML'25), every number computed from the points passed in.

The verdict's rule (written while the sweep ran, after seed 0's circuit and random runs and before any fact-lookup
or saliency result): a mask *forgets more after NF4* than the circuit (is more robust, in Guo et al.'s sense of
forgetting that an attack, here NF4 quantization, does not undo) when its forgetting after NF4 (relative, the
scorecard's scale) is higher by more than the larger of the two masks' seed sd and its PTQ gap passes on at least
as many seeds; *forgets less* in the mirror case; otherwise the difference is not resolved at this number of seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from mansu.attribution.localisation import LOCALISATIONS
from mansu.io import atomic_write_bytes, mean_sd, save_figure, write_json_atomic
from mansu.runs import layout
from mansu.science.localisation import LocalisationConfig, LocalisationPoint, by_seed, proposed
from mansu.scorecard import PROPERTIES, ScorecardConfig

CARD = ScorecardConfig()
MORE, LESS = "forgets more after NF4 than", "forgets less after NF4 than"
HELD = ("forgetting", "retain", "ptq_gap")  # the frontier's "holds" (mansu.science.frontier)
TRACE_SIGNAL = 0.05  # a layer restoring less than this share of the clean - corrupted effect localises nothing
NAMES = {"circuit": "EAP-IG circuit", "random": "random", "fact_mlp": "fact-lookup MLP", "saliency": "saliency"}


def forgot_nf4(p: LocalisationPoint) -> float:
    """Forgetting after NF4, relative to the forget headroom (the scorecard's forgetting minus the PTQ gap)."""
    return p.forgot - p.ptq_gap


def candidates(p: LocalisationPoint) -> int | None:
    """Coordinates MANSU proposed over its steps (read from the run's step log when the JSON predates the field)."""
    return p.proposed if p.proposed is not None else proposed(Path(p.run))


Setting = tuple  # (update_fraction, steps): one operating point of MANSU


def _unlearn_config(p: LocalisationPoint) -> dict:
    path = Path(p.run) / layout.CONFIG
    return json.loads(path.read_text())["spec"]["unlearn"] if path.is_file() else {}


def resolved(points: Sequence[LocalisationPoint]) -> list[LocalisationPoint]:
    """The points with the fields older JSONs lack read back from their runs (when the runs are still there)."""
    out = []
    for p in points:
        cfg = {} if None not in (p.update_fraction, p.steps) else _unlearn_config(p)
        out.append(replace(p, update_fraction=p.update_fraction or cfg.get("update_fraction"),
                           steps=p.steps or cfg.get("steps"), proposed=candidates(p)))
    return out


def setting(p: LocalisationPoint) -> Setting:
    return (p.update_fraction, p.steps)


def _setting_text(s: Setting) -> str:
    fraction, steps = s
    return f"uf {'?' if fraction is None else f'{fraction:g}'} x {steps or '?'} steps"


def _by_mask(points: Sequence[LocalisationPoint]) -> list[tuple[str, list[LocalisationPoint]]]:
    present = {p.localisation for p in points}
    return [(m, [p for p in points if p.localisation == m]) for m in LOCALISATIONS if m in present]


def _by_setting(points: Sequence[LocalisationPoint]) -> list[tuple[Setting, list[LocalisationPoint]]]:
    """The points per operating point (update_fraction, steps), in the order they were first run."""
    order = list(dict.fromkeys(setting(p) for p in points))
    return [(s, [p for p in points if setting(p) == s]) for s in order]


def _label(mask: str, s: Setting, several: bool) -> str:
    return NAMES[mask] + (f", {_setting_text(s)}" if several else "")


def _ci(pair) -> str:
    lo, hi = pair
    return "n/a" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"


def _passes(pts: Sequence[LocalisationPoint], prop: str) -> str:
    scored = [p.passes.get(prop) for p in pts if p.passes.get(prop) is not None]
    return f"{sum(scored)}/{len(pts)}" + ("" if len(scored) == len(pts) else f" ({len(pts) - len(scored)} unscored)")


def table(points: Sequence[LocalisationPoint]) -> list[str]:
    """The one table: a row per mask (per update_fraction when several), mean ± sd over its seeds, each property's
    pass count."""
    cols = ("mask", "seeds", "coordinates in mask", "proposed", "touched", "forget fp", "forget NF4",
            "forgotten fp", "forgotten NF4", "PTQ gap (CI high)", "retain lost", "probe lost", "CAD (CI low)",
            *PROPERTIES)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    sign = "{:+.3f}"
    groups = _by_setting(points)
    rows = [(_label(mask, st, len(groups) > 1), pts) for st, group in groups for mask, pts in _by_mask(group)]
    for label, pts in rows:
        cells = [label, str(len(pts)), mean_sd([p.mask_coordinates for p in pts], "{:,.0f}"),
                 mean_sd([candidates(p) for p in pts], "{:,.0f}"), mean_sd([p.touched for p in pts], "{:,.0f}"),
                 mean_sd([p.forget_fp for p in pts]), mean_sd([p.forget_nf4 for p in pts]),
                 mean_sd([p.forgot for p in pts]), mean_sd([forgot_nf4(p) for p in pts]),
                 f"{mean_sd([p.ptq_gap for p in pts], sign)} ({mean_sd([p.ptq_gap_ci[1] for p in pts], sign)})",
                 mean_sd([p.retain_lost for p in pts], "{:+.3f}"), mean_sd([p.probe_lost for p in pts], "{:+.3f}"),
                 f"{mean_sd([p.cad for p in pts])} ({mean_sd([p.cad_ci[0] for p in pts])})",
                 *(_passes(pts, prop) for prop in PROPERTIES)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_table(points: Sequence[LocalisationPoint]) -> list[str]:
    """Every run: its coordinates, the numbers with their 95% CIs, the properties it passes."""
    lines = ["| seed | mask | in mask | proposed | touched | forget fp / NF4 | PTQ gap [95% CI] | retain lost | "
             "probe lost | CAD [95% CI] | passes | run |", "|" + "---|" * 12]
    settings = [st for st, _ in _by_setting(points)]
    several = len(settings) > 1
    for seed, pts in sorted(by_seed(points).items()):
        for p in sorted(pts, key=lambda p: (settings.index(setting(p)), LOCALISATIONS.index(p.localisation))):
            passed = [prop for prop in PROPERTIES if p.passes.get(prop)]
            cad = "n/a" if p.cad is None else f"{p.cad:.3f} {_ci(p.cad_ci)}"
            layers = f" (m{', m'.join(map(str, p.layers))})" if p.layers else ""
            lines.append(f"| {seed} | {_label(p.localisation, setting(p), several)}{layers} | "
                         f"{p.mask_coordinates:,} | "
                         f"{candidates(p) or 0:,} | {p.touched:,} | {p.forget_fp:.3f} / {p.forget_nf4:.3f} | "
                         f"{p.ptq_gap:+.3f} {_ci(p.ptq_gap_ci)} | {p.retain_lost:+.3f} | {p.probe_lost:+.3f} | "
                         f"{cad} | {', '.join(passed) or 'none'} | `{Path(p.run).name}` |")
    return lines


def trace_lines(points: Sequence[LocalisationPoint]) -> list[str]:
    """What causal tracing found on each demo model (the fact-lookup rule's input)."""
    out = []
    for p in sorted({p.seed: p for p in points if p.trace}.values(), key=lambda p: p.seed):
        effects = ", ".join(f"m{i} {e:+.4f}" for i, e in enumerate(p.trace["effects"]))
        top = max(p.trace["effects"])
        share = top / p.trace["total"] if p.trace["total"] else float("nan")
        out.append(f"- model seed {p.seed}: indirect effects {effects} of a total clean - corrupted "
                   f"{p.trace['total']:+.3f} (logit difference, {p.trace['n_prompts']} prompts): the top layer "
                   f"restores {share:.1%} of it; the mask is m{', m'.join(map(str, p.layers or []))}.")
    if out and _untraced(points):
        out.append(f"\nNo layer restores {TRACE_SIGNAL:.0%} of the effect: tracing at the subject's last token "
                   "localises nothing on this model, and the rule's pick is its ordering of near-zero effects. On a "
                   "2-layer model this is structural: an MLP's output at the subject's position reaches the answer "
                   "position only through a later attention layer, so the last MLP's effect there is exactly 0, and "
                   "the first MLP's is what layer-1 attention reads from one position of a corrupted subject.")
    return out


def _untraced(points: Sequence[LocalisationPoint]) -> bool:
    """Whether causal tracing ran and no layer restored TRACE_SIGNAL of the effect on any model."""
    traced = [p for p in points if p.trace]
    return bool(traced) and all(max(p.trace["effects"]) < TRACE_SIGNAL * p.trace["total"] for p in traced)


def verdict(points: Sequence[LocalisationPoint]) -> list[str]:
    """The verdict at each operating point (update_fraction, steps)."""
    groups = _by_setting(points)
    if len(groups) == 1:
        return _verdict(points)
    return [line for st, pts in groups for line in (f"**At {_setting_text(st)}.**", "", *_verdict(pts), "")]


def _verdict(points: Sequence[LocalisationPoint]) -> list[str]:
    """Each mask against the circuit by the module docstring's rule, and what it says about Guo et al."""
    masks = dict(_by_mask(points))
    if "circuit" not in masks:
        return ["The circuit was not run: no comparison is made."]
    ref = masks["circuit"]
    lines, words = [], {}
    for mask, pts in masks.items():
        if mask == "circuit":
            continue
        diff = statistics.mean(map(forgot_nf4, pts)) - statistics.mean(map(forgot_nf4, ref))
        sd = max(_sd([forgot_nf4(p) for p in pts]), _sd([forgot_nf4(p) for p in ref]))
        gap = sum(bool(p.passes.get("ptq_gap")) for p in pts) - sum(bool(p.passes.get("ptq_gap")) for p in ref)
        resolved = min(len(pts), len(ref)) >= 2  # a seed sd needs two seeds
        word = (MORE if resolved and diff > sd and gap >= 0 else
                LESS if resolved and diff < -sd and gap <= 0 else "is not resolved from")
        words[mask] = word
        lines.append(f"- **{NAMES[mask]}** {word} the circuit: forgetting after NF4 {diff:+.3f} (relative; the "
                     f"larger seed sd {sd:.3f}), PTQ gap passes {gap:+d} seeds; forgetting + retain + PTQ gap at "
                     f"once on {_held(pts, HELD)} seeds (circuit {_held(ref, HELD)}), all four on "
                     f"{_held(pts, PROPERTIES)} (circuit {_held(ref, PROPERTIES)}).")
    ratios = [p.touched / c.touched for p in points for c in ref if c.seed == p.seed and p is not c]
    if ratios:
        lines.append(f"- Touched: at equal proposals, the masks moved {min(ratios):.0%}-{max(ratios):.0%} of the "
                     "circuit's coordinates on the same seed (the rest were proposals the floor could not realise).")
    if "fact_mlp" in words:
        answer = {MORE: "**supports**", LESS: "**does not support**"}.get(words["fact_mlp"], "**cannot decide**")
        lines = [f"On this demo, at this budget, the fact-lookup MLP mask {words['fact_mlp']} the EAP-IG circuit "
                 f"(NF4 survival by the PTQ gap's pass count): the demo {answer} Guo et al.'s finding (ICML'25: "
                 "fact-lookup MLPs give more robust unlearning than output-tracing attribution)"
                 + ("; but tracing localised nothing on these models (see Causal tracing), so this fact-lookup mask "
                    "is the rule's pick among near-zero effects, not a located fact store." if _untraced(points)
                    else "."), "", *lines]
    return lines


def _held(pts: Sequence[LocalisationPoint], props: Sequence[str]) -> str:
    return f"{sum(all(p.passes.get(prop) for prop in props) for p in pts)}/{len(pts)}"


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def write_figure(points: Sequence[LocalisationPoint], stem: Path) -> list[Path]:
    """stem.png / .svg: per mask, each seed's forgotten (fp filled, NF4 hollow), retain and probe lost, CAD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("forgotten (fp filled, NF4 hollow)", lambda p: p.forgot, forgot_nf4, CARD.forget_margin),
              ("retain lost (filled), probe lost (hollow)", lambda p: p.retain_lost, lambda p: p.probe_lost,
               CARD.retain_margin),
              ("PTQ gap, 95% CI high end (hollow)", lambda p: p.ptq_gap, lambda p: p.ptq_gap_ci[1], CARD.max_ptq_gap),
              ("CAD after NF4, 95% CI low end (hollow)", lambda p: p.cad, lambda p: p.cad_ci[0], CARD.cad_threshold))
    settings = _by_setting(points)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), layout="constrained")
    for ax, (title, filled, hollow, line) in zip(axes, panels):
        for x, (_, group) in enumerate(settings):
            for mask, pts in _by_mask(group):
                k = LOCALISATIONS.index(mask)
                for j, p in enumerate(sorted(pts, key=lambda p: p.seed)):
                    dx = (k - 1.5) * 0.2 + (j - (len(pts) - 1) / 2) * 0.05
                    f, h = filled(p), hollow(p)
                    if f is not None:
                        ax.scatter(x + dx, f, color=f"C{k}", edgecolor="k", lw=0.5, zorder=3,
                                   label=NAMES[mask] if x == 0 and j == 0 else None)
                    if h is not None:
                        ax.scatter(x + dx, h, facecolor="none", edgecolor=f"C{k}", lw=1.2, zorder=2)
        ax.axhline(line, color="g", ls="--", lw=0.8)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_xticks(range(len(settings)), [_setting_text(st) for st, _ in settings], fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    written = save_figure(fig, stem, dpi=100)
    plt.close(fig)
    return written


def rules() -> list[str]:
    b = "B = the EAP-IG circuit's quantizable coordinates"
    return [
        f"Every mask holds exactly {b} (the circuit at the neuron grain), so MANSU proposes the same number of "
        "coordinates on every row of a seed (`update_fraction` x B per step); only where they lie differs. The "
        "rules (mansu/attribution/localisation.py), fixed before any run:", "",
        "- **EAP-IG circuit**: the smallest faithful circuit of the EAP-IG graph, each MLP node owning its top "
        "neurons covering `mlp_neuron_mass` of its attribution (what a normal MANSU run uses).",
        "- **random**: B coordinates drawn uniformly without replacement from all quantizable weights "
        "(torch.Generator seeded with the run's seed).",
        "- **fact-lookup MLP** (causal tracing, Meng et al. 2022; the localisation Guo et al. favour): on the "
        "run's attribution prompts, the subject is corrupted (swapped for another record's, the circuit's own "
        "corruption); for each layer L the clean MLP output at the subject's last token is restored in the corrupted "
        "run, IE_L = mean of m(restored) - m(corrupted), m the logit difference. Layers in descending IE (ties: the "
        "lower); whole MLPs while they fit in B; in the first that does not fit, its hidden neurons (gate/up rows and "
        "down column) in descending sum of |forget-NLL gradient| over their weights, whole neurons while they fit, "
        "the remainder from the next neuron by |gradient|.",
        "- **saliency**: the top-B coordinates of |g_i| / (F_i + damping x mean F) over all quantizable weights, g "
        "the forget-NLL gradient at the base (the direction of NPO's at its reference), F the retain diagonal Fisher "
        "on `n_fisher` retain examples, damping = `fisher_damping` (1).", "",
        "CAD is measured over the EAP-IG circuit for every mask (the same circuit: one base cache per model), so "
        "it asks the same question of each update: how much of the circuit's attribution moved.",
    ]


# why each operating point is on the page (those of the sweeps so far; another setting is listed without a reason)
WHY = {(0.002, 20): "the demo's setting when this study began (UnlearnConfig's update_fraction, 20 steps)",
       (0.006, 20): "added after the first, because no mask forgot past the scorecard's bar there (3x the fraction, "
                    "chosen before any of its runs), so that masks are also compared where MANSU forgets",
       (0.002, 40): "the demo's setting since commit 7d6b4e9 (40 steps, chosen by a held-out rule on demo model 3, "
                    "not on these runs)"}


def operating_points(points: Sequence[LocalisationPoint]) -> list[str]:
    """The operating points (update_fraction x steps) of the page and why each is there."""
    settings = [st for st, _ in _by_setting(points)]
    if len(settings) < 2:
        return []
    return ["", "Operating points (MANSU's update_fraction x steps; everything else is its demo setting):", "",
            *(f"- {_setting_text(st)}" + (f": {WHY[st]}." if st in WHY else ".") for st in settings)]


def write_localisation_page(points: Sequence[LocalisationPoint], cfg: LocalisationConfig, out: Path, *,
                            seconds: float, commands: Sequence[str]) -> list[Path]:
    """out (markdown), out.with_suffix('.json') (the points) and the figure; returns the paths."""
    out = Path(out)
    if not points:
        raise ValueError("no localisation points to write")
    points = resolved(points)
    figure = write_figure(points, out.with_suffix(""))
    data = out.with_suffix(".json")
    write_json_atomic(data, {"config": asdict(cfg), "scorecard": CARD.__dict__, "commands": list(commands),
                             "wall_seconds": seconds, "points": [p.to_dict() for p in points]},
                      add_stamp=True)
    spec = json.loads((Path(points[0].run) / layout.CONFIG).read_text())["spec"] if \
        (Path(points[0].run) / layout.CONFIG).is_file() else {}
    made = "; ".join(f"`{c}`" for c in commands)
    base = points[0]
    lines = [
        "# Localisation at a fixed budget: does it matter where MANSU's update goes?", "",
        f"Generated by {made}" + (f" ({seconds / 60:.0f} min of sweep wall time)" if seconds else "")
        + f"; {len(points)} runs; the points (and each run folder) are in [{data.name}]({data.name}). Method: "
        "`mansu/science/localisation.py`.", "",
        "**Setup.** The demo world on its NF4-grid-aligned base, MANSU with its demo settings (kappa 1, retain "
        f"term 1) at {', '.join(_setting_text(st) for st, _ in _by_setting(points))}, the circuit "
        f"at the neuron grain (mlp_neuron_mass {cfg.mlp_neuron_mass}), attribution on "
        f"{spec.get('attribution_records', '?')} forget records x {spec.get('ig_steps', '?')} IG steps; seed s runs "
        "on demo model s and unlearns with seed s. Scored as `compare` scores (120 forget questions, the first "
        f"{cfg.retain_eval_limit} retain questions, NF4 simulated bit-exact) plus the demo's 80 held-out probe "
        f"questions (facts nobody optimised for). Base (seed {base.seed}): forget {base.forget_base:.3f}, retain "
        f"{base.retain_base:.3f}, probe {base.probe_base:.3f}.", "",
        "**Columns.** *forgotten* = (forget(base) - forget) / (forget(base) - chance), the scorecard's forgetting "
        f"(passes at >= {CARD.forget_margin}); *retain lost* and *probe lost* the same fraction of their headroom "
        f"(retain passes at <= {CARD.retain_margin}); *PTQ gap* relative to the forget headroom (passes when its "
        f"95% CI high end is <= {CARD.max_ptq_gap}); *CAD* after NF4 over the circuit, per fact with its 95% CI "
        "(the scorecard's; structural erasure also "
        "needs attribution that moved: mansu.scorecard). *proposed*: the coordinates MANSU selected over its steps; "
        "*touched*: those it moved (a proposal the floor cannot realise, at an absmax element or a grid edge, is "
        "not moved, so touched can differ by a few percent at equal proposals).", "",
        "## Rules", "", *rules(), *operating_points(points), "",
        "## Result", "", *table(points), "", *verdict(points), "",
        f"![localisation]({figure[0].name})  ([SVG]({figure[1].name}))", "",
        "### Causal tracing", "", *(trace_lines(points) or ["No fact-lookup run."]), "",
        "### Every run", "", *run_table(points), "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "\n".join(lines).encode())
    return [out, data, *figure]
