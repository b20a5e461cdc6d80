"""docs/phase.md from a phase sweep (mansu.science.phase): the figure (PNG and SVG), the tables, the findings
computed from the points, and how a user reads their own model's regime.  Nothing here is hard-coded from a run:
every number on the page comes from the points passed in.

The figure uses matplotlib (Agg; a dependency of captum, pinned in requirements.txt), imported inside
`write_figure`, so `import mansu` stays cheap and no browser is needed for a static image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mansu.io import atomic_write_bytes, save_figure, write_json_atomic
from mansu.science.phase import REGIMES, PhaseConfig, PhasePoint, gaussian_gap, points_to_json, predicted_gap

SHAPE_TITLES = {"gradient": "gradient-shaped update (|delta| ~ |x_j|, unlearning-like)",
                "sign": "coherent sign update (every |delta| = rho bins, SPEC's table)"}
KEPT_GAP = 0.1  # the "kept" regime's bound, REGIMES[0]
SNR_FLOOR = 0.03  # where points with snr 0 (k = 0: on the grid) are drawn on the log axis


def alignment_name(fraction: float) -> str:
    return "natural" if fraction == 0 else "nf4-grid" if fraction == 1 else f"nf4:{fraction:g}"


def _select(points: Sequence[PhasePoint], **where) -> list[PhasePoint]:
    return [p for p in points if all(getattr(p, k) == v for k, v in where.items())]


def write_figure(points: Sequence[PhasePoint], cfg: PhaseConfig, stem: Path) -> list[Path]:
    """stem.png and stem.svg: rows = update shapes, columns = aligned fractions, one curve per fan-in (measured gap
    with its 95% CI, solid) and the SNR prediction (dashed); a last column puts every point against sqrt(d k rho)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = len(cfg.fractions) + 1
    fig, axes = plt.subplots(len(cfg.shapes), ncols, figsize=(4.2 * ncols, 3.6 * len(cfg.shapes)), squeeze=False)
    colours = plt.get_cmap("viridis")([i / max(len(cfg.fan_ins) - 1, 1) * 0.85 for i in range(len(cfg.fan_ins))])
    for r, shape in enumerate(cfg.shapes):
        for c, f in enumerate(cfg.fractions):
            ax = axes[r][c]
            for colour, d in zip(colours, cfg.fan_ins):
                pts = _select(points, shape=shape, fraction=f, fan_in=d)
                ax.errorbar([p.ratio for p in pts], [p.gap for p in pts], yerr=[p.gap_ci for p in pts],
                            color=colour, marker="o", ms=3, lw=1.4, capsize=2, label=f"d = {d}")
                ax.plot([p.ratio for p in pts], [p.gap_pred for p in pts], color=colour, ls="--", lw=1)
            ax.set(xscale="log", ylim=(-0.03, 1.03), xlabel="median |delta| / bin width (rho)",
                   title=f"{alignment_name(f)} base\n{shape} update", ylabel="PTQ gap (facts brought back)")
            ax.grid(alpha=0.3)
        _collapse_panel(axes[r][-1], _select(points, shape=shape), cfg)
    axes[0][0].legend(fontsize=7, title="solid: measured\ndashed: SNR prediction", title_fontsize=7)
    fig.tight_layout()
    written = save_figure(fig, stem, dpi=110)
    plt.close(fig)
    return written


def _collapse_panel(ax, points: Sequence[PhasePoint], cfg: PhaseConfig) -> None:
    """Every point at x = sqrt(d k rho) (the predicted snr), with the prediction for k = 1 and k = 0.5."""
    markers = dict(zip(cfg.fractions, "osD^v"))
    for f in cfg.fractions:
        pts = [p for p in points if p.fraction == f]
        ax.scatter([max(p.snr_pred, SNR_FLOOR) for p in pts], [p.gap for p in pts], s=10, marker=markers[f],
                   alpha=0.7, label=alignment_name(f))
    xs = [10 ** (-1.5 + i * 0.05) for i in range(81)]
    d = 1024  # the predictions depend on (k, snr) only: any d with rho = snr^2 / (d k) gives the same curve
    for k, style in ((1.0, "k-"), (0.5, "k:")):
        ax.plot(xs, [predicted_gap(k, d, x * x / (d * k)) for x in xs], style, lw=1, label=f"prediction k={k:g}")
    ax.plot(xs, [gaussian_gap(1.0, d, x * x / d) for x in xs], color="grey", ls="--", lw=0.8,
            label="Gaussian limit k=1")
    ax.set(xscale="log", ylim=(-0.03, 1.03), xlabel="predicted snr = sqrt(d k rho)", ylabel="PTQ gap",
           title=f"all points vs the SNR argument\n{points[0].shape if points else ''} update")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def gap_table(points: Sequence[PhasePoint], cfg: PhaseConfig, shape: str, fraction: float) -> list[str]:
    """Rows rho, columns fan-in: 'gap +- CI (prediction)'."""
    head = "| rho | " + " | ".join(f"d = {d}" for d in cfg.fan_ins) + " |"
    lines = [head, "|---" * (len(cfg.fan_ins) + 1) + "|"]
    for rho in cfg.ratios:
        cells = []
        for d in cfg.fan_ins:
            p = _select(points, shape=shape, fraction=fraction, fan_in=d, ratio=rho)[0]
            cells.append(f"{p.gap:.3f} +- {p.gap_ci:.3f} ({p.gap_pred:.3f})")
        lines.append(f"| {rho:.3g} | " + " | ".join(cells) + " |")
    return lines


def findings(points: Sequence[PhasePoint], cfg: PhaseConfig) -> list[str]:
    """Bullet sentences computed from the points."""
    out = []
    for shape in cfg.shapes:
        grid = _select(points, shape=shape, fraction=1.0)
        if grid:
            top = undone_up_to(grid, cfg.ratios)
            where = f"up to rho = {top:.3g}" if top else "at no ratio of the grid"
            half = [p for p in grid if p.gap < 0.5]
            first_half = f"; the gap falls below 0.5 from rho = {min(p.ratio for p in half):.3g}" if half else ""
            out.append(f"- **{shape} update, nf4-grid base:** every fan-in has gap >= 0.99 (the full reversal) "
                       f"{where}{first_half}.")
        nat = _select(points, shape=shape, fraction=0.0)
        for d in cfg.fan_ins if nat else ():
            kept = [p for p in _select(nat, fan_in=d) if p.gap <= KEPT_GAP]
            if kept:
                p = min(kept, key=lambda q: q.ratio)
                out.append(f"- {shape} update, natural base, d = {d}: gap <= {KEPT_GAP} from rho = {p.ratio:.3g} "
                           f"(gap {p.gap:.3f}, sqrt(d k rho) = {p.snr_pred:.1f}); at rho = {cfg.ratios[0]:.3g} the "
                           f"gap is {_select(nat, fan_in=d)[0].gap:.3f}.")
    out.extend(_partial_and_fit(points, cfg))
    return out


def undone_up_to(points: Sequence[PhasePoint], ratios: Sequence[float]) -> float | None:
    """The largest grid ratio up to which every point has gap >= 0.99 (None if even the smallest does not)."""
    top = None
    for r in sorted(ratios):
        if not all(p.gap >= 0.99 for p in points if p.ratio == r):
            break
        top = r
    return top


def _partial_and_fit(points: Sequence[PhasePoint], cfg: PhaseConfig) -> list[str]:
    out = []
    for f in (f for f in cfg.fractions if 0 < f < 1):
        pts = [p for p in points if p.fraction == f and p.ratio <= 0.1 and p.fan_in >= 1024]
        if pts:
            gaps = [p.gap for p in pts]
            out.append(f"- {alignment_name(f)} base, d >= 1024, rho <= 0.1: gap {min(gaps):.3f} to {max(gaps):.3f} "
                       f"(a fraction f of the groups on the grid brings back about f of the facts).")
    gauss = [p for p in points if p.fraction == 0 and p.snr_pred >= 2]
    poisson = [p for p in points if p.fraction == 0 and p.snr_pred ** 2 < 1]
    for label, pts in (("sqrt(d k rho) >= 2", gauss), ("d k rho < 1", poisson)):
        if pts:
            errs = sorted(abs(p.gap - p.gap_pred) for p in pts)
            out.append(f"- natural base, {label} ({len(pts)} points): |measured - predicted gap| median "
                       f"{errs[len(errs) // 2]:.3f}, max {errs[-1]:.3f}.")
    return out


READING = """## Reading your own model's regime

1. **Alignment k.** Run `mansu diagnose --model <your model> --ratio <rho>`: it reports, per quantizer, the kept
   fraction k of a coherent update of rho bin widths (1 for weights spread inside their cells, 0 for weights on
   the grid, 1 - f for a base with a fraction f of its groups on the grid), each layer's fan-in d and
   sqrt(d k rho).
2. **Update size rho.** The median |delta| / bin width of your unlearning update: a run's survival report gives it
   (`ratio` quantiles), or estimate it before running as (per-step update x steps) / typical bin width
   (NF4's bins are 0.08-0.17 x the block absmax).  Also look at the 95th percentile: on an aligned base the
   reversal holds only while the largest moves stay under ~0.4 bin widths, so a heavy-tailed update (the
   gradient-shaped rows, whose largest moves are several times the median) escapes it at a smaller median.
3. **Read the regime.** Find your (k, sqrt(d k rho)) on the right-hand panel: k near 0 and rho under ~0.4 bins:
   *undone* (NF4 restores what was forgotten: the reversal; a floored update such as MANSU's is needed);
   k near 1 and sqrt(d k rho) >= ~4: *kept* (NF4 keeps the forgetting; the gap is under 0.1); in between, or
   d k rho below ~1: *noisy* (in expectation kept, but most output units see few or no level changes, so single
   facts come back at random).  A partially aligned base brings back about the aligned fraction of the facts.
"""


def demo_section(demo: Sequence) -> list[str]:
    """The demo model's points (mansu.science.phase_demo.DemoPoint) as a table."""
    lines = ["## On the demo model", "",
             "One Adam-like step (eta sign(forget NLL gradient), median |delta| / bin = rho, absmax frozen) on the "
             "demo model, the same step on each base alignment; forget cloze accuracy in fp and after NF4; gap = the "
             "fraction of the facts forgotten in fp that NF4 brings back (blank when fp forgot < 0.1).  Prediction: "
             "k from `mansu diagnose` on that base, d = the hidden size (a fact's logit sums many units, so the real "
             "noise is smaller).  Method: `mansu/science/phase_demo.py`.", "",
             "| base | rho | forget base | forget fp | forget NF4 | gap | k | predicted gap |", "|---" * 8 + "|"]
    for p in demo:
        gap = "" if p.gap is None else f"{p.gap:.3f}"
        lines.append(f"| {alignment_name(p.fraction)} | {p.ratio:.3g} | {p.acc_base:.3f} | {p.acc_fp:.3f} | "
                     f"{p.acc_nf4:.3f} | {gap} | {p.kept_pred:.3f} | {p.gap_pred:.3f} |")
    return [*lines, ""]


def write_phase_page(points: Sequence[PhasePoint], cfg: PhaseConfig, out: Path, *, seconds: float,
                     command: str, demo: Sequence | None = None) -> list[Path]:
    """out (markdown), out.with_suffix('.json') (the points) and the figure next to it; returns the paths."""
    out = Path(out)
    figure = write_figure(points, cfg, out.with_suffix(""))
    data = out.with_suffix(".json")
    write_json_atomic(data, points_to_json(points, cfg), add_stamp=True)
    regimes = ", ".join(f"{name} (predicted gap < {upper:g})" for name, upper in REGIMES[:-1])
    lines = [
        "# The reversal's phase diagram: when does NF4 undo a sub-bin update?", "",
        f"Generated by `{command}` in {seconds:.0f} s (CPU); the points are in [{data.name}]({data.name}).",
        f"Quantizer {cfg.quantizer}; synthetic layers of {cfg.n_out} output units, weights N(0, 0.02^2), seed "
        f"{cfg.seed}; the method and every definition are in `mansu/science/phase.py`.", "",
        "**Setup.** A random layer W [n_out, d]; a base with a fraction f of its 64-weight NF4 blocks replaced by "
        "their round trip (`nf4:f`: f = 0 natural, 1 nf4-grid); a probe input x; an update that lowers every "
        "output on x, with median |delta| / bin width rho (absmax weights frozen, so the scales never move).", "",
        "**PTQ gap of a synthetic layer.** Each output unit is a fact whose margin is uniform in (0, its fp drop): "
        "the update forgets every fact in fp, and the gap is the fraction that NF4 brings back, "
        "mean_i clip(1 - kappa_i, 0, 1) with kappa_i = (NF4 change of output i) / (fp change). 1 = full reversal, "
        "0 = forgetting kept.  95% CIs are over units.", "",
        "**Prediction (SPEC's signal-to-noise argument).** Unit i sees N_i ~ Poisson(d k rho) level changes, so "
        "kappa_i = k N_i / (d k rho) has mean k and spread k / snr, snr = sqrt(d k rho); k = the base's kept "
        "fraction from `mansu diagnose`.  Dashed in the figure, in brackets in the tables; the Gaussian limit "
        "(SPEC's form) is the grey curve of the right-hand panels (grid points with k = 0 sit at its left edge).  "
        f"  Regimes by predicted gap: {regimes}, else undone.", "",
        f"![phase diagram]({figure[0].name})  ([SVG]({figure[1].name}))", "",
        "## Findings", "", *findings(points, cfg), "", READING, *(demo_section(demo) if demo else []),
        "## Tables: gap +- 95% CI (prediction)", ""]
    for shape in cfg.shapes:
        for f in cfg.fractions:
            lines += [f"### {SHAPE_TITLES.get(shape, shape)}, {alignment_name(f)} base", "",
                      *gap_table(points, cfg, shape, f), ""]
    atomic_write_bytes(out, ("\n".join(lines).rstrip() + "\n").encode())
    return [out, data, *figure]
