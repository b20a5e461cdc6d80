"""`python -m mansu report RUN [RUN ...] --out FILE`: the reviewer report (mansu/viz/reviewer.py) of the first run,
compared with the others, as one self-contained HTML file; the same document as the app's Report page.

Every run id is validated and every run loaded before anything is written: a bad id gives one `error:` line, exit
status 2 and no file.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from mansu.io import atomic_write_bytes
from mansu.runs.store import load_run, validate_run_id


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write the reviewer report (HTML, printable to PDF) of one or more runs",
                              description="Write the reviewer report of RUN (the first id), compared with the other "
                                          "runs given: claim and verdict, setup, results with 95 percent intervals, "
                                          "captioned figures, limitations and the commands that reproduce it. "
                                          "One self-contained HTML file; print it to PDF from a browser.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids (see `mansu runs`); the first is the primary run")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="where to write the HTML (default <first run id>-report.html in the current folder)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    ids = [validate_run_id(r) for r in args.runs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a run id is given twice: {' '.join(ids)}")
    runs = [load_run(r) for r in ids]  # FileNotFoundError for an unknown id: nothing written yet
    broken = [r for r in runs if r.corrupt]
    if broken:
        raise ValueError(f"run {broken[0].run_id} cannot be read: {broken[0].corrupt}")
    out = Path(args.out or f"{ids[0]}-report.html")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")

    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    from mansu.viz.reviewer import reviewer_report  # plotly only when a report is written (the CLI runs without it)

    atomic_write_bytes(out, reviewer_report(runs, generated=generated).encode("utf-8"))
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0
