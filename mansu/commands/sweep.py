"""`python -m mansu sweep <experiment>`: sweeps too heavy for `compare`, each writing its own docs page.

    sweep phase --out docs/phase.md    the reversal's phase diagram on synthetic layers (mansu.science.phase)

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
