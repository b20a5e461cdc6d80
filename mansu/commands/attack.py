"""`python -m mansu attack RUN --kind relearn|relearn-unrelated|quantize-relearn|all`: relearning attacks on a run's
unlearned model (rebuilt from its sparse update, as `mansu export` does) and, with `--kind all`, its durability
certificate (mansu.attack.relearn has the protocol).

    python -m mansu attack 20261130-211500-mansu-nf4-grid-s0 --kind all --steps 20 --records 16

Writes attack_<kind>.json (recovery curve + recovered fraction per precision) into the run folder, and
certificate.json after `all`.  The run id, the kind, the settings, the run's update and base evaluation and the
data files are checked before the model loads: a bad one gives one `error:` line and nothing written.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from mansu.attack.relearn import ALL, KINDS, AttackConfig, attack_data, check_kind, run_attack, write_certificate
from mansu.choices import DEVICES
from mansu.options import add_flags, given
from mansu.runs import layout
from mansu.runs.store import read_config, read_metrics, run_dir, validate_run_id


def register(subparsers) -> None:
    p = subparsers.add_parser("attack", help="relearning attacks on a run's unlearned model; --kind all also writes "
                                             "its durability certificate",
                              description="Fine-tune the unlearned model of RUN (fp: every weight; "
                                          "quantize-relearn: a LoRA adapter on its frozen NF4 twin, as QLoRA) on a "
                                          "few forget records (relearn, quantize-relearn) or unrelated ones "
                                          "(relearn-unrelated), scoring forget and retain accuracy along the way. "
                                          "Writes attack_<kind>.json; --kind all writes certificate.json.")
    p.add_argument("run", metavar="RUN", help="run id (see `mansu runs`)")
    p.add_argument("--kind", required=True, help=f"{', '.join(KINDS)}, or {ALL} (every attack + certificate.json)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to attack (default cpu)")
    p.set_defaults(func=handle, _fields=add_flags(p, AttackConfig))


def check_run(run: Path) -> None:
    """The run has what an attack needs: a sparse update and a base forget evaluation (one line otherwise)."""
    if not (run / layout.MODEL_UPDATE).is_file():
        raise FileNotFoundError(f"run {run.name} has no {layout.MODEL_UPDATE} (its unlearning did not finish, or it "
                                "was made before sparse updates); attacks need the unlearned model")
    if not ((read_metrics(run).get("base_fp") or {}).get("forget") or {}).get("correct"):
        raise ValueError(f"run {run.name} has no base forget evaluation in metrics.json; attacks measure recovery "
                         "towards it")


def handle(args: argparse.Namespace) -> int:
    kind = check_kind(args.kind)
    run = run_dir(validate_run_id(args.run))
    cfg = AttackConfig(**{**{f.name: f.default for f in fields(AttackConfig)}, **given(args, args._fields)})
    check_run(run)
    from mansu.spec import RunSpec

    spec = RunSpec.from_dict(read_config(run)["spec"])
    kinds = list(KINDS) if kind == ALL else [kind]
    for k in kinds:
        attack_data(spec, k, cfg)  # every data file readable before the first model loads
    results = {}
    for k in kinds:
        results[k] = run_attack(run, k, cfg, device=args.device)
        print(summary_line(results[k]))
    if kind == ALL:
        print(f"wrote {write_certificate(run, results)}")
    return 0


def summary_line(result: dict) -> str:
    """One line per attack: forget accuracy from step 0 to the end and the recovered fraction per precision."""
    curve = result["curve"]
    parts = []
    for precision, s in result["summary"].items():
        if s.get("recovered") is None:
            parts.append(f"{precision} n/a ({s.get('reason', 'not measured')})")
        else:
            parts.append(f"{precision} {s['recovered']:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]")
    return (f"{result['kind']}: forget {curve[0]['forget']:.3f} -> {curve[-1]['forget']:.3f} in {curve[-1]['step']} "
            f"steps; recovered fraction ({next(iter(result['summary'].values())).get('on', '?')}) "
            + ", ".join(parts))
