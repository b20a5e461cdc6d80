"""docs/frontiers.md from a frontier sweep (mansu.science.frontier): the figure (PNG and SVG), the JSON of the
points, the tables and the verdicts, every number computed from the points passed in.

The figure uses matplotlib (Agg; pinned in requirements.txt), imported inside `write_figure` as in
mansu.science.phase_report, so `import mansu` stays cheap.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from mansu.io import atomic_write_bytes, save_figure, write_json_atomic
from mansu.io import mean_sd as _ms
from mansu.science.frontier import FRONTIER_METHODS, HELD, FrontierConfig, FrontierPoint, config_to_json
from mansu.scorecard import ScorecardConfig

CARD = ScorecardConfig()


def _by_setting(points: Sequence[FrontierPoint]) -> dict[tuple[str, str], list[FrontierPoint]]:
    out: dict[tuple[str, str], list[FrontierPoint]] = {}
    for p in points:
        out.setdefault((p.group, p.label), []).append(p)
    return out


def _panels(points: Sequence[FrontierPoint]) -> list[tuple[str, list[FrontierPoint]]]:
    """(title, points) per panel: one per baseline method (MANSU's points drawn on each), then the Fisher pair."""
    methods = list(dict.fromkeys(p.method for p in points if p.group == "baseline"))
    mansu = [p for p in points if p.group == "mansu"]
    out = [(m, [p for p in points if p.group == "baseline" and p.method == m] + mansu) for m in methods]
    if not methods and mansu:
        out.append(("mansu", mansu))
    fisher = [p for p in points if p.group == "fisher"]
    return out + ([("Fisher bound: bounded vs unbounded MANSU", fisher)] if fisher else [])


def write_figure(points: Sequence[FrontierPoint], stem: Path) -> list[Path]:
    """stem.png and stem.svg: per panel, forgot (x) vs retain lost (y), fp point filled and NF4 point hollow joined
    by a segment, both coloured by the PTQ gap; MANSU as stars; the region where a point holds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    panels = _panels(points)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols + 1, 4.2 * nrows), squeeze=False, layout="constrained")
    gaps = [p.ptq_gap for p in points]
    norm = TwoSlopeNorm(vcenter=0.0, vmin=min(min(gaps), -0.05), vmax=max(max(gaps), 0.05))
    cmap = plt.get_cmap("coolwarm")
    for ax, (title, pts) in zip(axes.flat, panels):
        _panel(ax, title, pts, cmap, norm)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8,
                 label="PTQ gap / forget headroom (red: NF4 restores answers)")
    written = save_figure(fig, stem, dpi=100)
    plt.close(fig)
    return written


def _panel(ax, title: str, pts: Sequence[FrontierPoint], cmap, norm) -> None:
    right = max([1.05] + [p.forgot_fp + 0.05 for p in pts] + [p.forgot_nf4 + 0.05 for p in pts])
    low = min([-0.02] + [p.retain_lost_fp - 0.01 for p in pts] + [p.retain_lost_nf4 - 0.01 for p in pts])
    ax.fill_between([CARD.forget_margin, right], low, CARD.retain_margin, color="#d9f2d9", zorder=0,
                    label="forgetting and retain pass")
    for p in pts:
        colour = cmap(norm(p.ptq_gap))
        marker = "*" if p.method.startswith("mansu") else "o"
        size = 150 if marker == "*" else 45
        ax.plot([p.forgot_fp, p.forgot_nf4], [p.retain_lost_fp, p.retain_lost_nf4], color="0.55", lw=0.8, zorder=1)
        ax.scatter(p.forgot_fp, p.retain_lost_fp, s=size, marker=marker, color=colour, edgecolor="k", lw=0.5,
                   zorder=3)
        ax.scatter(p.forgot_nf4, p.retain_lost_nf4, s=size, marker=marker, facecolor="none", edgecolor=colour,
                   lw=1.2, zorder=2)
    for (_, label), group in _by_setting(pts).items():  # each setting named once, at its seeds' mean fp point
        ax.annotate(label.split(" ", 1)[1] if label.startswith(title) else label.replace("update_fraction", "uf"),
                    (statistics.mean(p.forgot_fp for p in group), statistics.mean(p.retain_lost_fp for p in group)),
                    fontsize=6, xytext=(5, 4), textcoords="offset points")
    ax.axhline(CARD.retain_margin, color="g", ls="--", lw=0.8)
    ax.axvline(CARD.forget_margin, color="g", ls="--", lw=0.8)
    ax.set_xlim(right=right)
    ax.set(title=title, xlabel="forgotten (fraction of above-chance forget accuracy)",
           ylabel="retain lost (fraction of above-chance retain accuracy)")
    ax.title.set_fontsize(9)
    ax.xaxis.label.set_fontsize(7)
    ax.yaxis.label.set_fontsize(7)
    ax.grid(alpha=0.3)



COLUMNS = (("forget fp", "forget_fp", "{:.3f}"), ("forget NF4", "forget_nf4", "{:.3f}"),
           ("forgotten fp", "forgot_fp", "{:.3f}"), ("forgotten NF4", "forgot_nf4", "{:.3f}"),
           ("PTQ gap", "ptq_gap", "{:+.3f}"), ("gap CI high", "ptq_gap_ci_high", "{:+.3f}"),
           ("retain fp", "retain_fp", "{:.3f}"), ("retain lost", "retain_lost_fp", "{:+.3f}"),
           ("median abs(delta)/bin", "median_ratio", "{:.3g}"))


def table(points: Sequence[FrontierPoint], extra: Sequence[tuple[str, str, str]] = ()) -> list[str]:
    """One row per setting, mean ± sd over its seeds, and how many seeds pass each held property and all three."""
    cols = (*COLUMNS, *extra)
    lines = ["| setting | seeds | " + " | ".join(c[0] for c in cols) + " | " + " | ".join(HELD) + " | all three |",
             "|" + "---|" * (len(cols) + len(HELD) + 3)]
    methods = list(dict.fromkeys(p.method for p in points))
    rows = sorted(_by_setting(points).items(),  # by method (first seen), then lr; stable for settings without one
                  key=lambda kv: (methods.index(kv[1][0].method), kv[1][0].changes.get("lr", 0.0)))
    for (_, label), pts in rows:
        cells = [_ms([getattr(p, key) for p in pts], fmt) for _, key, fmt in cols]
        passes = [f"{sum(p.passes[h] for p in pts)}/{len(pts)}" for h in HELD]
        lines.append(f"| {label} | {len(pts)} | " + " | ".join(cells) + " | " + " | ".join(passes)
                     + f" | **{sum(p.holds for p in pts)}/{len(pts)}** |")
    return lines


def verdict(points: Sequence[FrontierPoint]) -> list[str]:
    """The claim "no baseline setting reaches forgetting + retain + NF4 survival at once", shown or refuted."""
    base = [p for p in points if p.group == "baseline"]
    if not base:
        return ["No baseline was run: the claim is not tested here."]
    holding = [p for p in base if p.holds]
    settings = _by_setting(base)
    two = sorted({p.label for p in base if sum(p.passes.values()) == 2 and not p.holds})
    if holding:
        names = sorted({f"{p.label} (seed {p.seed})" for p in holding})
        head = (f"**Refuted on this grid:** {len(holding)} of {len(base)} baseline runs hold forgetting, retain and "
                f"NF4 survival at once: {', '.join(names)}.")
    else:
        head = (f"**Shown on this grid:** none of the {len(base)} baseline runs ({len(settings)} settings x seeds) "
                f"holds forgetting, retain and NF4 survival at once.")
    out = [head, ""]
    if two:
        out.append(f"Settings with a run passing two of the three: {', '.join(two)}; per run, what it missed:")
        out += [f"- {p.label}, seed {p.seed}: misses {', '.join(h for h in HELD if not p.passes[h])} (forgotten fp "
                f"{p.forgot_fp:.3f}, NF4 {p.forgot_nf4:.3f}, gap CI high {p.ptq_gap_ci_high:+.3f}, retain lost "
                f"{p.retain_lost_fp:+.3f})" for p in base if p.label in two and sum(p.passes.values()) == 2]
        out.append("")
    mansu = [p for p in points if p.group == "mansu"]
    if mansu:
        out.append(f"MANSU: {sum(p.holds for p in mansu)} of {len(mansu)} runs hold all three "
                   f"(per setting in the MANSU table below).")
    return out


def rmu_lines(points: Sequence[FrontierPoint]) -> list[str]:
    rmu = [p for p in points if p.method == "rmu"]
    if not rmu:
        return []
    best = max(rmu, key=lambda p: p.forgot_fp)
    forgets = [p for p in rmu if p.passes["forgetting"]]
    return [f"RMU (its `demo` coefficients, WMDP's; scaled to the demo's width they do not help either: "
            f"docs/demo_search.md section 1c): "
            f"{len(forgets)} of {len(rmu)} runs pass forgetting; the most forgotten is {best.label} seed "
            f"{best.seed}: forget {best.forget_fp:.3f} fp, {best.forget_nf4:.3f} NF4, retain lost "
            f"{best.retain_lost_fp:+.3f}.", ""]


def missing_lines(points: Sequence[FrontierPoint]) -> list[str]:
    """The lr-driven baselines not on the page, and how to add them without redoing the others."""
    missing = [m for m in FRONTIER_METHODS if m not in {p.method for p in points}]
    if not missing:
        return []
    return [f"Not on this page: {', '.join(missing)} (add them with `mansu sweep frontier --methods "
            f"{','.join(missing)} --mansu-fractions '' --fisher-epsilons '' --merge docs/frontiers.json`).", ""]


def fisher_section(points: Sequence[FrontierPoint]) -> list[str]:
    pts = [p for p in points if p.group == "fisher"]
    if not pts:
        return []
    extra = (("Fisher cost 1/2 sum F delta^2", "fisher_cost", "{:.3g}"), ("budget used", "budget_used", "{:.3g}"),
             ("weights moved", "params_touched", "{:.0f}"))
    changes = ", ".join(f"{k} = {v:g}" for k, v in pts[0].changes.items() if k != "epsilon")
    seeds = ", ".join(map(str, sorted({p.seed for p in pts})))
    lines = ["## The Fisher bound doing its job (issue 13, item 7)", "",
             f"MANSU with {changes} (the demo's other settings), seeds {seeds}: without the bound "
             "(`mansu_no_fisher`, epsilon = inf) and with it. The bound keeps coordinates in priority order while "
             "the running second-order retain damage 1/2 sum F_i delta_i^2 stays <= epsilon (mansu/unlearn/fisher.py)"
             "; once spent, later steps move nothing. At the default epsilon 0.05 it never binds on the demo (the "
             "memorised base's retain Fisher is tiny), so the epsilons here are far smaller; **they were chosen "
             "after seeing the unbounded runs' Fisher cost** (docs/demo_search.md section 2c).", "",
             *table(pts, extra), ""]
    free = [p for p in pts if p.method == "mansu_no_fisher"]
    for label in dict.fromkeys(p.label for p in pts if p.method != "mansu_no_fisher"):
        bound = [p for p in pts if p.label == label]
        lines.append(f"- {label} vs unbounded: retain lost {_ms([p.retain_lost_fp for p in bound])} vs "
                     f"{_ms([p.retain_lost_fp for p in free])}, forgotten (fp) {_ms([p.forgot_fp for p in bound])} vs "
                     f"{_ms([p.forgot_fp for p in free])}, budget used {_ms([p.budget_used for p in bound], '{:.3g}')}"
                     f", weights moved {_ms([p.params_touched for p in bound], '{:.0f}')} vs "
                     f"{_ms([p.params_touched for p in free], '{:.0f}')}.")
    return [*lines, "", *cost_vs_damage([p for p in points if p.fisher_cost is not None]), ""]


def cost_vs_damage(points: Sequence[FrontierPoint]) -> list[str]:
    """Every MANSU run's Fisher cost (the bound's estimate of retain damage) next to its measured retain loss,
    sorted by cost: whether the second-order estimate ranks runs by the damage they do."""
    if len(points) < 2:
        return []
    rows = sorted(points, key=lambda p: p.fisher_cost)
    return ["Fisher cost (the bound's second-order estimate of retain damage, nats) against the retain loss each "
            "MANSU run measured, sorted by cost:", "",
            "| run | seed | Fisher cost | retain lost | forgotten fp |", "|---|---|---|---|---|",
            *(f"| {p.label} | {p.seed} | {p.fisher_cost:.3g} | {p.retain_lost_fp:+.3f} | {p.forgot_fp:.3f} |"
              for p in rows)]


def _model_seeds(points: Sequence[FrontierPoint]) -> str:
    """The demo models the points ran on, e.g. "seed 0 (the demo model)" or "seed 3"."""
    seeds = sorted({p.model_seed for p in points})
    return "seed" + ("s " if len(seeds) > 1 else " ") + ", ".join(map(str, seeds)) + (
        " (the demo model)" if seeds == [0] else "")

def write_frontier_page(points: Sequence[FrontierPoint], cfg: FrontierConfig, out: Path, *, seconds: float,
                        commands: Sequence[str]) -> list[Path]:
    """out (markdown), out.with_suffix('.json') (the points) and the figure next to it; returns the paths.
    `commands`: the sweeps that made the points (earlier ones merged with --merge first, this one last)."""
    out = Path(out)
    figure = write_figure(points, out.with_suffix(""))
    data = out.with_suffix(".json")
    write_json_atomic(data, {"config": config_to_json(cfg),  # the last command's (merged points: their commands)
                             "scorecard": CARD.__dict__, "commands": list(commands), "wall_seconds": seconds,
                             "points": [p.to_dict() for p in points]}, add_stamp=True)
    made = "; ".join(f"`{c}`" for c in commands)
    base = points[0]
    lines = [
        "# Baselines as frontiers: can any gradient baseline forget, keep retain and survive NF4 at once?", "",
        f"Generated by {made}" + (f" ({seconds / 60:.0f} min of sweep wall time)" if seconds else "")
        + f"; {len(points)} runs (each point's run folder is "
        f"in the JSON); the points are in [{data.name}]({data.name}). Method and definitions: "
        "`mansu/science/frontier.py`.", "",
        "**Setup.** The demo world on its NF4-grid-aligned base (the base of the dual failure), demo model "
        f"{_model_seeds(points)}, each method's demo settings (mansu/unlearn/demo_settings.py) except the swept "
        "ones; every point is a normal pipeline run, "
        f"scored as `compare` scores it (120 forget questions, the first {cfg.retain_eval_limit} retain questions, "
        f"NF4 simulated bit-exact). Base: forget {base.forget_base:.3f}, retain {base.retain_base:.3f}.", "",
        f"**Axes.** x: *forgotten* = (forget(base) - forget) / (forget(base) - chance), the scorecard's forgetting "
        f"(passes at >= {CARD.forget_margin}); y: *retain lost* = the same fraction of the retain headroom (passes "
        f"at <= {CARD.retain_margin}). Each run is a filled marker (fp) joined to a hollow one (after NF4); colour "
        f"= the PTQ gap relative to the forget headroom (passes when its 95% CI high end is <= {CARD.max_ptq_gap}). "
        "Circles: the baseline of the panel; stars: MANSU (the same on every panel). A run *holds* when it passes "
        "forgetting, retain and PTQ gap at once (the green band is forgetting's; retain's line is dashed).", "",
        "## Verdict", "", *verdict(points), "", *rmu_lines(points), *missing_lines(points),
        f"![frontiers]({figure[0].name})  ([SVG]({figure[1].name}))", "",
        "## Baselines (mean ± sd over seeds; passes = seeds passing / seeds)", "",
        *table([p for p in points if p.group == "baseline"]), "",
        "## MANSU", "", *table([p for p in points if p.group == "mansu"],
                               (("weights moved", "params_touched", "{:.0f}"),)), "",
        *fisher_section(points)]
    atomic_write_bytes(out, ("\n".join(lines).rstrip() + "\n").encode())
    return [out, data, *figure]
