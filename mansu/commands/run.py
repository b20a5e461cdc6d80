"""`python -m mansu run`: one unlearning method (or a queue of runs) on any model and data, through the pipeline.

    python -m mansu run --demo --method mansu                 # the demo world with the demo settings (results.md)
    python -m mansu run --model ./llama --forget f.jsonl --retain r.jsonl --method npo --steps 50
    python -m mansu run --spec a.json --spec b.json           # a queue: every run validated and listed first
    python -m mansu run --resume RUN_ID                       # continue a killed run from its last finished stage
    python -m mansu run --from-run RUN_ID --kappa 1.5         # same run with another floor (the app's "apply")

Every flag below `--method` is generated from a typed field of RunSpec, UnlearnConfig or ScorecardConfig
(mansu/options.py).  Everything is validated (settings, model folder, data files) before a run folder exists.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mansu.options import add_flags, given
from mansu.pipeline import RunFailed, preflight, run_pipeline, start_queue, start_run
from mansu.runs.store import read_config, read_metrics, run_dir, validate_run_id
from mansu.scorecard import ScorecardConfig, format_scorecard
from mansu.spec import DEMO, RunSpec, demo_spec, specs_from_file
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.methods import METHODS

log = logging.getLogger(__name__)
FLAG_GROUPS = {"spec": RunSpec, "unlearn": UnlearnConfig, "scorecard": ScorecardConfig}


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="unlearn with one method and evaluate (fp, NF4, CAD, scorecard)",
                              description="Run one unlearning method through the pipeline: base evaluation, circuit, "
                                          "unlearning, fp and NF4 evaluation, attribution after, CAD, survival, "
                                          "scorecard. Writes a run folder (see docs/unlearning.md).",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="methods:\n" + "\n".join(f"  {m:<17} {c.summary}" for m, c in METHODS.items()))
    p.add_argument("--demo", action="store_true",
                   help="the demo world (model 'demo') with the demo settings of the method (docs/results.md); "
                        "flags given override them")
    p.add_argument("--spec", action="append", default=[], metavar="FILE.json",
                   help="a whole RunSpec as JSON (repeat for a queue run one after another); flags override it")
    p.add_argument("--method", choices=list(METHODS), default=None, help="unlearning method (default mansu)")
    fields = {name: add_flags(p, cls) for name, cls in FLAG_GROUPS.items()}
    p.set_defaults(_fields=fields)
    p.add_argument("--resume", metavar="RUN_ID", help="resume a run from its last finished stage")
    p.add_argument("--from-run", metavar="RUN_ID", help="new run from another run's settings, base eval and circuit; "
                                                        "flags given override its settings (e.g. --kappa)")
    p.add_argument("--json", action="store_true", help="print the scorecard as JSON")
    p.set_defaults(func=handle)


def _overrides(args) -> dict[str, dict]:
    out = {name: given(args, names) for name, names in args._fields.items()}
    if args.method is not None:
        out["unlearn"]["method"] = args.method
    return out


def _apply(spec: RunSpec, changes: dict[str, dict]) -> RunSpec:
    """`spec` with the given flags applied (nested settings merged, then re-validated)."""
    data = spec.to_dict()
    data.update(changes["spec"])
    data["unlearn"] = {**data["unlearn"], **changes["unlearn"]}
    data["scorecard"] = {**data["scorecard"], **changes["scorecard"]}
    return RunSpec.from_dict(data)


def build_specs(args) -> list[RunSpec]:
    """The validated specs of a fresh run (or queue): bad settings fail here, before any work."""
    changes = _overrides(args)
    if args.spec:
        if args.demo:
            raise ValueError("give --spec or --demo, not both")
        return [_apply(spec, changes) for path in args.spec for spec in specs_from_file(path)]
    if args.demo:
        if changes["spec"].get("model", DEMO) != DEMO:
            raise ValueError("--demo runs the demo model; drop --model, or drop --demo")
        method = changes["unlearn"].pop("method", "mansu")
        return [_apply(demo_spec(method), changes)]
    if "model" not in changes["spec"]:
        raise ValueError("give --demo, --spec FILE, or --model (with --forget and --retain)")
    return [_apply(RunSpec(model=changes["spec"]["model"], forget=changes["spec"].get("forget", ""),
                           retain=changes["spec"].get("retain", "")), changes)]


def _from_parent(args) -> RunSpec:
    parent = RunSpec.from_dict(read_config(run_dir(validate_run_id(args.from_run)))["spec"])
    return _apply(parent, _overrides(args)).replace(parent_run=args.from_run)


def _finish(run: Path, as_json: bool) -> int:
    log.info("run folder %s", run)
    try:
        card = run_pipeline(run)
    except RunFailed as exc:
        print(f"run {run.name} failed: {exc}")
        return 1
    print(json.dumps(card, default=str) if as_json else f"run {run.name}\n{format_scorecard(card)}")
    line = (read_metrics(run).get("advice") or {}).get("line")
    if line and not as_json:  # mansu.advice: the flag to change when the run missed (the app shows it too)
        print(f"next step: {line}")
    return 0


def handle(args: argparse.Namespace) -> int:
    if args.resume:
        return _finish(run_dir(validate_run_id(args.resume)), args.json)
    specs = [_from_parent(args)] if args.from_run else build_specs(args)
    for spec in specs:
        preflight(spec)
    if len(specs) == 1:
        return _finish(start_run(specs[0]), args.json)
    runs = start_queue(specs)
    codes = [_finish(run, args.json) for run in runs]  # a failed run does not stop the queue
    return max(codes)
