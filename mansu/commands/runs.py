"""`python -m mansu runs`: list the runs in the store with their state and stage."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list runs (newest first)",
                              description="List the run folders under $MANSU_RUNS (default $MANSU_HOME/runs) with "
                                          "method, state and stage. A run whose process died shows as failed; a "
                                          "folder whose files cannot be read shows as corrupt, with the reason.")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mansu.paths import runs_root
    from mansu.runs.store import list_runs

    runs = list_runs()
    if not runs:
        print(f"no runs under {runs_root()}")
        return 0
    for r in runs:
        row = {"run_id": r.run_id, "method": str(r.config.get("method", "-")), "state": r.status.get("state"),
               "stage": r.status.get("stage"), "error": r.status.get("error")}
        if args.json:
            print(json.dumps(row))
        else:
            err = f"  ({row['error']})" if row["error"] else ""
            print(f"{row['run_id']:<45} {row['method']:<12} {row['state']:<10} {row['stage']}{err}")
    return 0
