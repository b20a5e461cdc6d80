"""`python -m mansu runs`: list the runs in the store with their state and stage."""

from __future__ import annotations

import argparse
import json

from mansu.launch import cancel_run
from mansu.paths import runs_root
from mansu.runs.store import list_runs, validate_run_id


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list runs (newest first)",
                              description="List the run folders under $MANSU_RUNS (default $MANSU_HOME/runs) with "
                                          "method, state and stage. A run whose process died shows as failed; a "
                                          "folder whose files cannot be read shows as corrupt, with the reason.")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.add_argument("--cancel", metavar="RUN_ID",
                   help="stop the backend working on this run (and the rest of its queue)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.cancel:
        cancel_run(validate_run_id(args.cancel))
        print(f"cancelled {args.cancel} (and the queued runs of its backend process)")
        return 0
    runs = list_runs()
    if not runs:
        print(f"no runs under {runs_root()}")
        return 0
    for r in runs:
        row = {"run_id": r.run_id, "method": str(r.config.get("method", "-")), "state": r.status.get("state"),
               "stage": r.status.get("stage"), "step": r.status.get("step"), "total": r.status.get("total"),
               "error": r.status.get("error")}
        if args.json:
            print(json.dumps(row))
        else:
            err = f"  ({row['error']})" if row["error"] else ""
            progress = f" {row['step']}/{row['total']}" if row["state"] == "running" and row["total"] else ""
            print(f"{row['run_id']:<45} {row['method']:<12} {row['state']:<10} {row['stage']}{progress}{err}")
    return 0
