"""`python -m mansu sweep <experiment>`: sweeps too heavy for `compare`, each writing its own docs page.

    sweep phase --out docs/phase.md    the reversal's phase diagram on synthetic layers (mansu.science.phase)
    sweep frontier --out docs/frontiers.md    baselines over a learning-rate grid vs MANSU (mansu.science.frontier)
    sweep localisation --out docs/localisation.md    MANSU restricted to equal-size masks (mansu.science.localisation)

Every option is validated (PhaseConfig) before anything runs or is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from mansu.quant.registry import DEFAULT_QUANTIZER, QUANTIZERS


def _csv(text: str, cast, what: str) -> tuple:
    try:
        values = tuple(cast(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of {cast.__name__} values") from None
    if not values:
        raise ValueError(f"{what} {text!r} names no value")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="heavier sweeps that write their own docs page (phase)",
                              description="Controlled sweeps that are too heavy for `compare`.")
    experiments = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    ph = experiments.add_parser("phase", help="the reversal's phase diagram on synthetic layers",
                                description="PTQ gap of synthetic linear layers as a function of the update's median "
                                            "|delta| / bin width, the fan-in and the fraction of the base aligned to "
                                            "the grid, with the signal-to-noise prediction sqrt(d k rho) "
                                            "(mansu/science/phase.py). Writes OUT, OUT's .json (the points) and "
                                            "its figure as .png and .svg. Grid options default to the documented "
                                            "sweep (mansu.science.phase: FAN_INS, FRACTIONS, RATIOS, UPDATE_SHAPES).")
    ph.add_argument("--out", default="docs/phase.md", help="the markdown page to write (default docs/phase.md)")
    ph.add_argument("--fan-ins", help="comma-separated fan-ins d (default 64,256,1024,4096)")
    ph.add_argument("--fractions", help="aligned fractions f in [0, 1]: 0 natural, 1 grid (default 0,0.5,1)")
    ph.add_argument("--ratios", help="median |delta| / bin width values rho in (0, 2] (default 10 log-spaced, 1e-3..1)")
    ph.add_argument("--shapes", help="update shapes among gradient, sign (default both)")
    ph.add_argument("--quant", default=DEFAULT_QUANTIZER, choices=tuple(QUANTIZERS), help="the quantizer")
    ph.add_argument("--n-out", type=int, help="output units (facts) per point (default 512)")
    ph.add_argument("--seed", type=int, default=0, help="seed of the layers, probes and alignment masks")
    ph.add_argument("--demo", action="store_true",
                    help="also measure a few points on the demo model (mansu/science/phase_demo.py; ~5-10 min on "
                         "2 cores; builds the demo first when missing)")
    ph.set_defaults(func=run_phase)
    _register_frontier(experiments)
    _register_localisation(experiments)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def phase_config(args: argparse.Namespace):
    """The PhaseConfig the flags name (PhaseConfig's defaults for those not given); ValueError on bad values."""
    from mansu.science.phase import PhaseConfig

    given = {"fan_ins": (args.fan_ins, int), "fractions": (args.fractions, float), "ratios": (args.ratios, float),
             "shapes": (args.shapes, str)}
    kwargs = {k: _csv(text, cast, "--" + k.replace("_", "-")) for k, (text, cast) in given.items() if text is not None}
    if args.n_out is not None:
        kwargs["n_out"] = args.n_out
    return PhaseConfig(**kwargs, quantizer=args.quant, seed=args.seed)


def demo_points():
    """The demo model's phase points (built first when missing)."""
    from mansu.models.demo import ensure_demo
    from mansu.science.phase_demo import demo_phase

    assets = ensure_demo()
    return demo_phase(assets.model_dir, assets.forget_path, progress=lambda done, total: print(
        f"\rdemo points {done}/{total}", end="", file=sys.stderr, flush=True))


def run_phase(args: argparse.Namespace) -> int:
    from mansu.science.phase import phase_sweep
    from mansu.science.phase_report import write_phase_page

    out = Path(args.out)
    if out.suffix != ".md":
        raise ValueError(f"--out must be a markdown file ending in .md, got {args.out!r}")
    cfg = phase_config(args)
    start = time.perf_counter()
    points = phase_sweep(cfg, progress=lambda done, total: print(f"\rbases {done}/{total}", end="",
                                                                    file=sys.stderr, flush=True))
    print(file=sys.stderr)
    demo = demo_points() if args.demo else None
    rest = sys.argv[sys.argv.index("phase") + 1:] if "phase" in sys.argv else ["--out", str(out)]
    command = " ".join(["mansu sweep phase", *map(shlex.quote, rest)])
    for path in write_phase_page(points, cfg, out, seconds=time.perf_counter() - start, command=command, demo=demo):
        print(path)
    return 0


def _register_frontier(experiments) -> None:
    fr = experiments.add_parser("frontier", help="gradient baselines over a learning-rate grid vs MANSU, on the demo",
                                description="Each lr-driven baseline over a learning-rate (and step) grid and seeds, "
                                            "MANSU's points and the Fisher-bound pair, all normal runs on the "
                                            "NF4-grid demo base (mansu/science/frontier.py). Writes OUT, OUT's .json "
                                            "(the points) and its figure as .png and .svg. Defaults: the documented "
                                            "sweep (mansu.science.frontier.FrontierConfig); ~40 min on 2 cores.")
    fr.add_argument("--out", default="docs/frontiers.md", help="the markdown page to write (default docs/frontiers.md)")
    fr.add_argument("--quick", action="store_true",
                    help="a tiny grid (graddiff at lr 1e-3 and MANSU, 2 steps, seed 0, 20 retain questions): a smoke "
                         "test of the whole path; the other grid options then override it")
    fr.add_argument("--methods", help="comma-separated lr-driven baselines ('' for none; default "
                                      "graddiff,npo,ga,gu,simnpo,rmu)")
    fr.add_argument("--lrs", help="comma-separated learning rates (default 3e-5,1e-4,3e-4,5e-4,1e-3)")
    fr.add_argument("--steps", help="comma-separated step counts of the baselines (default 20)")
    fr.add_argument("--seeds", help="comma-separated seeds of the baselines (default 0,1,2)")
    fr.add_argument("--mansu-fractions", help="MANSU's update_fraction values ('' for no MANSU points; default "
                                              "0.002,0.004)")
    fr.add_argument("--mansu-seeds", help="seeds of MANSU and the Fisher pair (default 0,1,2)")
    fr.add_argument("--mansu-steps", type=int, help="MANSU's steps (default its demo setting)")
    fr.add_argument("--fisher-epsilons", help="epsilons of the bounded Fisher-pair runs ('' to skip the pair)")
    fr.add_argument("--retain-eval-limit", type=int, help="retain questions scored (default 200)")
    fr.add_argument("--model-seed", type=int, metavar="N",
                    help="the demo model's training seed, as `mansu run --demo --model-seed` (default 0, the demo "
                         "model; 3 is the held-out model the demo settings are chosen on; build it first with "
                         "`mansu demo --model-seed N`)")
    fr.add_argument("--runs", help="folder for the run folders (default the runs folder, MANSU_RUNS)")
    fr.add_argument("--threads", type=int, help="torch CPU threads (1 is faster when other processes share the cores)")
    fr.add_argument("--merge", default="", metavar="JSON,...",
                    help="also put the points of earlier frontier sweeps (their JSON) on the page, before this "
                         "sweep's: a sweep split over processes, or extended later, without redoing its runs")
    fr.set_defaults(func=run_frontier)


FRONTIER_LISTS = {"methods": str, "lrs": float, "steps": int, "seeds": int, "mansu_fractions": float,
                  "mansu_seeds": int, "fisher_epsilons": float}
MAY_BE_EMPTY = ("methods", "mansu_fractions", "fisher_epsilons")


def frontier_config(args: argparse.Namespace):
    """The FrontierConfig the flags name (the default sweep, or QUICK with --quick); ValueError on bad values."""
    import dataclasses

    from mansu.science.frontier import QUICK, FrontierConfig

    kwargs = {}
    for name, cast in FRONTIER_LISTS.items():
        text = getattr(args, name)
        if text is not None:
            empty = name in MAY_BE_EMPTY and not text.strip()
            kwargs[name] = () if empty else _csv(text, cast, "--" + name.replace("_", "-"))
    for name in ("mansu_steps", "retain_eval_limit", "model_seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return dataclasses.replace(QUICK, **kwargs) if args.quick else FrontierConfig(**kwargs)


def frontier_command(args: argparse.Namespace) -> str:
    """The command line of this sweep, rebuilt from the parsed flags (also right when called as main(argv))."""
    flags = ["--quick"] if args.quick else []
    for name in ("out", *FRONTIER_LISTS, "mansu_steps", "retain_eval_limit", "model_seed", "runs", "threads", "merge"):
        value = getattr(args, name)
        if value is not None and (value != "" or name in MAY_BE_EMPTY):
            flags += ["--" + name.replace("_", "-"), shlex.quote(str(value))]
    return " ".join(["mansu sweep frontier", *flags])


def run_frontier(args: argparse.Namespace) -> int:
    import torch

    from mansu.science.frontier import frontier_sweep, read_points, settings
    from mansu.science.frontier_report import write_frontier_page

    out, runs = _page_and_runs(args)
    cfg = frontier_config(args)
    merged = [read_points(Path(p.strip())) for p in args.merge.split(",") if p.strip()]  # read before any run
    if not settings(cfg) and not merged:
        raise ValueError("nothing to plot: no baseline, MANSU or Fisher run and no --merge")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = frontier_command(args)
    start = time.perf_counter()
    partial, save_partial = _partial_points(out, command, start)
    points = frontier_sweep(cfg, runs, on_point=save_partial, progress=lambda i, n, s: print(
        f"run {i + 1}/{n}: {s.label} seed {s.seed}", file=sys.stderr, flush=True))
    commands = [c for _, cs, _ in merged for c in cs] + ([command] if points or not merged else [])
    seconds = sum(s for _, _, s in merged) + (time.perf_counter() - start if points else 0.0)
    for path in write_frontier_page([p for ps, _, _ in merged for p in ps] + points, cfg, out, seconds=seconds,
                                    commands=commands):
        print(path)
    partial.unlink(missing_ok=True)
    return 0


def _register_localisation(experiments) -> None:
    lo = experiments.add_parser("localisation", help="MANSU restricted to equal-size masks: circuit, random, "
                                                     "fact-lookup MLPs, gradient saliency (on the demo)",
                                description="The same MANSU run on the NF4-grid demo base with its update restricted "
                                            "to the EAP-IG circuit and to masks of the same coordinate count: random, "
                                            "the fact-lookup MLPs (causal tracing) and gradient saliency "
                                            "(mansu/attribution/localisation.py, mansu/science/localisation.py). "
                                            "Seed s runs on demo model s. Writes OUT, OUT's .json and its figure "
                                            "(.png, .svg); ~20-30 min on 2 cores.")
    lo.add_argument("--out", default="docs/localisation.md", help="the markdown page (default docs/localisation.md)")
    lo.add_argument("--quick", action="store_true", help="seed 0, 20 retain questions, 4 attributed records: a smoke "
                                                         "test of the whole path")
    lo.add_argument("--localisations", help="comma-separated masks (default circuit,random,fact_mlp,saliency)")
    lo.add_argument("--seeds", help="comma-separated seeds, each the demo model's and the unlearning's (default 0,1,2)")
    lo.add_argument("--mlp-neuron-mass", type=float, help="the circuit's neuron grain (default 0.8)")
    lo.add_argument("--retain-eval-limit", type=int, help="retain questions scored (default 200)")
    lo.add_argument("--attribution-records", type=int, help="forget records attributed (default the demo's)")
    lo.add_argument("--ig-steps", type=int, help="EAP-IG steps (default the demo's)")
    lo.add_argument("--update-fraction", type=float, help="MANSU's update_fraction (default its demo setting)")
    lo.add_argument("--runs", help="folder for the run folders (default the runs folder, MANSU_RUNS)")
    lo.add_argument("--threads", type=int, help="torch CPU threads (1 is faster when other processes share the cores)")
    lo.add_argument("--merge", default="", metavar="JSON,...", help="also put the points of earlier localisation "
                                                                    "sweeps (their JSON) on the page")
    lo.add_argument("--page-only", action="store_true", help="no runs: write the page from --merge's points")
    lo.set_defaults(func=run_localisation)


LOCALISATION_LISTS = {"localisations": str, "seeds": int}
LOCALISATION_VALUES = ("mlp_neuron_mass", "retain_eval_limit", "attribution_records", "ig_steps", "update_fraction")


def localisation_config(args: argparse.Namespace):
    """The LocalisationConfig the flags name (the default sweep, or QUICK); ValueError on bad values."""
    import dataclasses

    from mansu.science.localisation import QUICK, LocalisationConfig

    kwargs = {name: _csv(getattr(args, name), cast, "--" + name) for name, cast in LOCALISATION_LISTS.items()
              if getattr(args, name) is not None}
    kwargs.update({name: getattr(args, name) for name in LOCALISATION_VALUES if getattr(args, name) is not None})
    return dataclasses.replace(QUICK, **kwargs) if args.quick else LocalisationConfig(**kwargs)


def localisation_command(args: argparse.Namespace) -> str:
    flags = ["--quick"] if args.quick else []
    for name in ("out", *LOCALISATION_LISTS, *LOCALISATION_VALUES, "runs", "threads", "merge"):
        value = getattr(args, name)
        if value is not None and value != "":
            flags += ["--" + name.replace("_", "-"), shlex.quote(str(value))]
    return " ".join(["mansu sweep localisation", *flags, *(["--page-only"] if args.page_only else [])])


def run_localisation(args: argparse.Namespace) -> int:
    import torch

    from mansu.science.localisation import localisation_sweep, read_points
    from mansu.science.localisation_report import write_localisation_page

    out, runs = _page_and_runs(args)
    cfg = localisation_config(args)
    merged = [read_points(Path(p.strip())) for p in args.merge.split(",") if p.strip()]  # read before any run
    if args.page_only and not merged:
        raise ValueError("--page-only writes the page from --merge's points: give --merge JSON")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = localisation_command(args)
    start = time.perf_counter()
    partial, save_partial = _partial_points(out, command, start)
    points = [] if args.page_only else localisation_sweep(cfg, runs, on_point=save_partial, progress=lambda i, n, w, s:
                                                          print(f"run {i + 1}/{n}: {w} seed {s}", file=sys.stderr,
                                                                flush=True))
    commands = [c for _, cs, _ in merged for c in cs] + ([] if args.page_only else [command])
    seconds = sum(s for _, _, s in merged) + (time.perf_counter() - start if points else 0.0)
    for path in write_localisation_page([p for ps, _, _ in merged for p in ps] + points, cfg, out, seconds=seconds,
                                        commands=commands):
        print(path)
    partial.unlink(missing_ok=True)
    return 0


def _page_and_runs(args: argparse.Namespace) -> tuple[Path, Path]:
    """A run sweep's --out page and --runs folder, with --threads, checked before any run (one line each)."""
    from mansu.paths import runs_root

    out = Path(args.out)
    if out.suffix != ".md":
        raise ValueError(f"--out must be a markdown file ending in .md, got {args.out!r}")
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise ValueError(f"--threads must be in [1, 256], got {args.threads}")
    runs = Path(args.runs) if args.runs else runs_root()
    if runs.exists() and not runs.is_dir():
        raise ValueError(f"--runs {args.runs!r} exists and is not a folder")
    return out, runs


def _partial_points(out: Path, command: str, start: float):
    """(OUT's .partial.json, a callback writing the points so far there): for --merge if the sweep is stopped."""
    from mansu.io import write_json_atomic

    partial = out.with_suffix(".partial.json")

    def save_partial(points) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(partial, {"commands": [command + " (partial)"], "points": [p.to_dict() for p in points],
                                    "wall_seconds": time.perf_counter() - start})
    return partial, save_partial
