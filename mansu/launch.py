"""Start, find, follow and cancel backend runs without streamlit: the app's only way to start work.

A launch writes its validated `RunSpec`s to a JSON file under <MANSU_HOME>/launches and starts
`python -m mansu run --spec FILE [--spec FILE ...]` as a separate process (its own session, so a cancel reaches
its children; never inside a Streamlit rerun).  A queue of several specs is one backend process that creates every
run folder up front ("queued"), so the whole chain lives in the run store: any browser tab, and `mansu runs`,
sees its progress, and any tab can cancel it.  Output goes to a log file, so a backend error reads as one line.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mansu.io import write_json_atomic
from mansu.paths import mansu_home, runs_root
from mansu.pipeline import check_inputs
from mansu.runs.store import RunSummary, list_runs, read_status, run_dir, validate_run_id, write_status
from mansu.spec import RunSpec

ACTIVE = ("queued", "running")


def spec_file(specs: list[RunSpec], label: str) -> Path:
    """Write the specs of one launch as a JSON list (checked first: settings, model folder, data files)."""
    for spec in specs:
        check_inputs(spec, build_demo=False)  # the backend builds a missing demo, with its own progress
    launches_dir().mkdir(parents=True, exist_ok=True)
    path = launches_dir() / f"{_stamp()}-{_safe(label)}.json"
    write_json_atomic(path, [spec.to_dict() for spec in specs])
    return path


def run_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "mansu", "run", "--spec", str(path)]


def launch_runs(specs: list[RunSpec], label: str) -> tuple[subprocess.Popen, Launched]:
    """Validate `specs` and start them as one backend process (a queue when there are several)."""
    if not specs:
        raise ValueError("nothing to launch: give at least one run")
    return start_backend(run_command(spec_file(specs, label)), label=label)


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def _safe(label: str) -> str:
    return "".join(c for c in label if c.isalnum() or c in "-_")[:30] or "run"


@dataclass(frozen=True)
class Launched:
    pid: int
    command: list[str]
    log_path: Path
    started_at: str


def launches_dir() -> Path:
    return mansu_home() / "launches"


def start_backend(command: list[str], *, label: str = "run", cwd: Path | None = None) -> tuple[subprocess.Popen,
                                                                                               Launched]:
    """Start the backend in its own session (so cancel reaches its children); output goes to a log file."""
    log_dir = launches_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{_stamp()}-{_safe(label)}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MANSU_RUNS": str(runs_root()), "MANSU_HOME": str(mansu_home())}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(cwd or Path(__file__).resolve().parent.parent), env=env, start_new_session=True)
    return proc, Launched(proc.pid, list(command), log_path, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def runs_of_pid(pid: int, root: Path | None = None) -> list[RunSummary]:
    """The runs a backend process created (a queue has several), oldest first."""
    def order(run: RunSummary) -> tuple:
        queue = run.config.get("queue") if isinstance(run.config.get("queue"), dict) else {}
        return str(run.config.get("created_at", "")), int(queue.get("index", 0)), run.run_id

    return sorted((r for r in list_runs(root) if r.status.get("pid") == pid), key=order)


def find_run_for_pid(pid: int, root: Path | None = None) -> str | None:
    """The id of the run process `pid` is working on (else its last run), if it created any."""
    runs = runs_of_pid(pid, root)
    active = [r for r in runs if r.status.get("state") == "running"]
    return (active or runs)[-1].run_id if runs else None


def active_runs(root: Path | None = None) -> list[RunSummary]:
    """Every queued or running run in the store, whichever tab or terminal started it."""
    return [r for r in list_runs(root) if r.status.get("state") in ACTIVE]


def log_tail(path: Path, n_lines: int = 20) -> str:
    """The last lines of a launch log ('' when missing)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n_lines:])


def backend_error(log_text: str) -> str | None:
    """The backend's readable error: its last 'error: ...' line, else the last traceback line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    for line in reversed(lines):
        if "Error" in line.split(":")[0]:
            return line
    return None


@dataclass(frozen=True)
class Progress:
    fraction: float
    text: str
    eta_s: float | None
    state: str


def _parse_time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def progress_of(status: dict[str, Any], now: dt.datetime | None = None) -> Progress:
    """Stage, step of total, a 0..1 fraction and an ETA from status.json (backend's own eta_s wins)."""
    step, total = int(status.get("step") or 0), int(status.get("total") or 0)
    fraction = min(1.0, step / total) if total > 0 else 0.0
    state = str(status.get("state", "unknown"))
    if state == "finished":
        fraction = 1.0
    eta = status.get("eta_s")
    started = _parse_time(status.get("stage_started_at") or status.get("started_at"))
    if eta is None and started is not None and 0 < fraction < 1:
        elapsed = ((now or dt.datetime.now(dt.UTC)) - started).total_seconds()
        eta = elapsed * (1 - fraction) / fraction
    stage = status.get("stage", "?")
    text = f"{state} · stage {stage}" + (f" · step {step}/{total}" if total else "")
    if eta is not None and state == "running":
        text += f" · ETA {float(eta):.0f} s"
    return Progress(fraction, text, None if eta is None else float(eta), state)


def cancel_run(run_id: str, root: Path | None = None) -> None:
    """Stop the backend process working on `run_id` (its whole process group) and mark its unfinished runs
    (the queue it belongs to) cancelled; works from any tab, for any run in the store."""
    status = read_status(run_dir(validate_run_id(run_id), root))
    pid = status.get("pid")
    if isinstance(pid, int):
        _terminate(pid)
        for run in runs_of_pid(pid, root):
            _mark_cancelled(run_dir(run.run_id, root))
    else:
        _mark_cancelled(run_dir(run_id, root))


def _terminate(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _mark_cancelled(path: Path) -> None:
    status = read_status(path)
    if status.get("state") in (*ACTIVE, "failed"):
        write_status(path, str(status.get("stage", "?")), int(status.get("step") or 0),
                     int(status.get("total") or 0), state="cancelled", error="cancelled by the user")


def exports_dir(run_id: str) -> Path:
    """Where the app writes a run's report and figure images: <MANSU_HOME>/exports/<run_id>."""
    return mansu_home() / "exports" / validate_run_id(run_id)
