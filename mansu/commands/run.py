"""`python -m mansu run`: one unlearning method on any model and data, through the whole pipeline.

    python -m mansu run --demo --method mansu --base-alignment nf4-grid
    python -m mansu run --model ./llama --forget forget.jsonl --retain retain.jsonl --method npo --steps 50
    python -m mansu run --resume RUN_ID                  # continue a killed run from its last finished stage
    python -m mansu run --from-run RUN_ID --kappa 1.5     # same run with another floor (the app's "apply")
"""

from __future__ import annotations

import argparse
import json

UNLEARN_FLAGS = {  # flag -> (UnlearnConfig field, type, help)
    "--method": ("method", str, "mansu, mansu_no_floor, mansu_no_circuit, mansu_no_fisher, ga, graddiff, npo, "
                                "simnpo, rmu, sure, gu, ssd (default mansu)"),
    "--steps": ("steps", int, "unlearning steps"),
    "--lr": ("lr", float, "learning rate (baselines; MANSU's proposal scale)"),
    "--seed": ("seed", int, "random seed"),
    "--batch-size": ("batch_size", int, "forget/retain sequences per step"),
    "--objective": ("objective", str, "MANSU's forget objective: npo or ga"),
    "--kappa": ("kappa", float, "floor: minimum move in NF4 bin widths (0, 16]"),
    "--epsilon": ("epsilon", float, "Fisher budget: 1/2 sum F delta^2 <= epsilon (use inf for no bound)"),
    "--k": ("k", int, "retain gradients spanning the projected-out subspace"),
    "--update-fraction": ("update_fraction", float, "MANSU candidates per step, fraction of circuit weights"),
    "--optimizer": ("optimizer", str, "baselines' optimizer: adam or sgd"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="unlearn with one method and evaluate (fp, NF4, CAD, scorecard)",
                              description="Run one unlearning method through the pipeline: base evaluation, circuit, "
                                          "unlearning, fp and NF4 evaluation, attribution after, CAD, survival, "
                                          "scorecard. Writes a run folder (see docs/unlearning.md).")
    p.add_argument("--demo", action="store_true", help="use the demo world's model, forget and retain sets")
    p.add_argument("--model", help="HF model folder or hub id")
    p.add_argument("--forget", help="forget MCQ file (JSONL/CSV/Parquet)")
    p.add_argument("--retain", help="retain MCQ file")
    for flag, (_, typ, text) in UNLEARN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other unlearning setting (e.g. --set rmu_alpha=100); VALUE is parsed as JSON")
    p.add_argument("--base-alignment", default=None, choices=["natural", "nf4-grid"],
                   help="natural fp32 base, or every Linear weight snapped to its NF4 round trip first")
    p.add_argument("--nf4-mode", default=None, choices=["simulated", "real"], help="NF4 twin (default simulated)")
    p.add_argument("--no-attribution", action="store_true", help="skip circuit/CAD (MANSU then uses all weights)")
    p.add_argument("--retain-eval-limit", type=int, default=None, help="score only the first N retain records")
    p.add_argument("--no-save-model", action="store_true", help="do not save the unlearned model")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"], help="auto: accelerate device_map")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    for flag, field in (("--forget-margin", "forget_margin"), ("--retain-margin", "retain_margin"),
                        ("--max-ptq-gap", "max_ptq_gap"), ("--cad-threshold", "cad_threshold")):
        p.add_argument(flag, type=float, default=None, dest=field, help=f"scorecard {field} (docs/unlearning.md)")
    p.add_argument("--resume", metavar="RUN_ID", help="resume a run from its last finished stage")
    p.add_argument("--from-run", metavar="RUN_ID", help="new run from another run's settings, base eval and circuit; "
                                                        "flags given override its settings (e.g. --kappa)")
    p.add_argument("--json", action="store_true", help="print the scorecard as JSON")
    p.set_defaults(func=handle)


def _unlearn_overrides(args) -> dict:
    out = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in UNLEARN_FLAGS.items()}
    out = {k: v for k, v in out.items() if v is not None}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    if "epsilon" in out and out["epsilon"] == float("inf"):
        out["epsilon"] = float("inf")
    return out


def _spec_overrides(args) -> dict:
    out = {"base_alignment": args.base_alignment, "nf4_mode": args.nf4_mode, "retain_eval_limit": args.retain_eval_limit,
           "device": args.device, "dtype": args.dtype}
    out = {k: v for k, v in out.items() if v is not None}
    if args.no_attribution:
        out["attribution"] = False
    if args.no_save_model:
        out["save_model"] = False
    card = {f: getattr(args, f) for f in ("forget_margin", "retain_margin", "max_ptq_gap", "cad_threshold")}
    if any(v is not None for v in card.values()):
        out["scorecard"] = {k: v for k, v in card.items() if v is not None}
    return out


def build_spec(args):
    """The RunSpec for a fresh run (validated: bad settings fail here, before any work)."""
    from mansu.pipeline import RunSpec

    if args.demo:
        from mansu.models.demo import ensure_demo

        assets = ensure_demo()
        model, forget, retain = str(assets.model_dir), str(assets.forget_path), str(assets.retain_path)
    else:
        if not (args.model and args.forget and args.retain):
            raise ValueError("give --demo, or all of --model, --forget and --retain")
        model, forget, retain = args.model, args.forget, args.retain
    for path in (forget, retain):
        from pathlib import Path

        if not Path(path).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    return RunSpec(model=model, forget=forget, retain=retain, unlearn=_unlearn_overrides(args), **_spec_overrides(args))


def _from_parent(args):
    from mansu.pipeline import RunSpec
    from mansu.runs.store import read_config, run_dir

    parent = run_dir(args.from_run)
    base = read_config(parent)["spec"]
    card = {**base.get("scorecard", {}), **_spec_overrides(args).pop("scorecard", {})}
    spec = {**base, **_spec_overrides(args), "scorecard": card, "parent_run": args.from_run,
            "unlearn": {**base.get("unlearn", {}), **_unlearn_overrides(args)}}
    return RunSpec.from_dict(spec), parent


def handle(args: argparse.Namespace) -> int:
    import logging

    from mansu.pipeline import RunFailed, copy_parent_stages, run_pipeline, start_run
    from mansu.runs.store import run_dir
    from mansu.scorecard import format_scorecard

    if args.resume:
        run = run_dir(args.resume)
    elif args.from_run:
        spec, parent = _from_parent(args)
        run = start_run(spec)
        copy_parent_stages(parent, run)
    else:
        run = start_run(build_spec(args))
    logging.getLogger(__name__).info("run folder %s", run)
    try:
        card = run_pipeline(run)
    except RunFailed as exc:
        print(f"run {run.name} failed: {exc}")
        return 1
    print(json.dumps(card, default=str) if args.json else f"run {run.name}\n{format_scorecard(card)}")
    return 0
