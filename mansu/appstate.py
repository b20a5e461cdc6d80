"""App-side backend control without streamlit: validate a launch form, build the
`python -m mansu run ...` command, start it as a separate process, find its run folder, report its
progress from status.json and cancel it.

The backend always runs in its own process (never inside a Streamlit rerun); its stdout and stderr
go to a log file under <MANSU_HOME>/launches so a backend error can be shown as a readable message.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mansu.paths import mansu_home, runs_root
from mansu.runs import layout
from mansu.runs.store import list_runs, read_status, write_status

# `python -m mansu run` flags for UnlearnConfig fields (mansu/commands/run.py); other fields go through --set
RUN_FLAGS = ("steps", "lr", "seed", "batch_size", "objective", "kappa", "epsilon", "k", "update_fraction", "optimizer")
ALIGNMENTS = ("natural", "nf4-grid")
Device = Literal["cpu", "cuda", "auto"]
DEVICES = ("cpu", "cuda", "auto")
METHODS = ("mansu", "ga", "graddiff", "npo", "simnpo", "rmu", "sure", "gu", "ssd",
           "mansu_no_floor", "mansu_no_circuit", "mansu_no_fisher")


@dataclass(frozen=True)
class LaunchSpec:
    """What the Launch form asks for; `demo=True` runs on the embedded demo world and model."""

    method: str = "mansu"
    demo: bool = True
    model: str = ""
    forget: str = ""
    retain: str = ""
    device: str = "cpu"
    base_alignment: str = "natural"
    hparams: dict[str, Any] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()


def validate_spec(spec: LaunchSpec, methods: tuple[str, ...] = METHODS) -> LaunchSpec:
    """Reject bad input before any process starts (one line saying what is wrong and what is accepted)."""
    if spec.method not in methods:
        raise ValueError(f"unknown method {spec.method!r}: accepted are {', '.join(methods)}")
    if spec.device not in DEVICES:
        raise ValueError(f"unknown device {spec.device!r}: accepted are {', '.join(DEVICES)}")
    if spec.base_alignment not in ALIGNMENTS:
        raise ValueError(f"unknown base alignment {spec.base_alignment!r}: accepted are {', '.join(ALIGNMENTS)}")
    if not spec.demo:
        if not spec.model.strip():
            raise ValueError("model path or id is empty: give a local model folder or a hub id, or tick 'demo'")
        for label, value in (("forget", spec.forget), ("retain", spec.retain)):
            if not value.strip():
                raise ValueError(f"{label} file is empty: give a .jsonl/.json/.csv/.parquet file")
            if not Path(value).expanduser().is_file():
                raise FileNotFoundError(f"{label} file {value!r} not found")
    for key, value in spec.hparams.items():
        if not key.replace("_", "").isalnum():
            raise ValueError(f"bad hyperparameter name {key!r}: letters, digits and _ only")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"hyperparameter {key} must be >= 0, got {value}")
    return spec


def build_command(spec: LaunchSpec) -> list[str]:
    """The backend command line for a validated spec: known settings as flags, the rest as --set KEY=JSON."""
    import json

    cmd = [sys.executable, "-m", "mansu", "run", "--method", spec.method, "--device", spec.device,
           "--base-alignment", spec.base_alignment]
    if spec.demo:
        cmd.append("--demo")
    else:
        cmd += ["--model", spec.model, "--forget", spec.forget, "--retain", spec.retain]
    for key, value in sorted(spec.hparams.items()):
        if value is None or value == "":
            continue
        if key in RUN_FLAGS:
            cmd += ["--" + key.replace("_", "-"), str(value)]
        else:
            cmd += ["--set", f"{key}={json.dumps(value)}"]
    return [*cmd, *spec.extra_args]


@dataclass(frozen=True)
class Launched:
    pid: int
    command: list[str]
    log_path: Path
    started_at: str


def launches_dir() -> Path:
    return mansu_home() / "launches"


def start_backend(command: list[str], *, label: str = "run", cwd: Path | None = None) -> tuple[subprocess.Popen, Launched]:
    """Start the backend in its own session (so cancel reaches its children); output goes to a log file."""
    log_dir = launches_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    log_path = log_dir / f"{stamp}-{''.join(c for c in label if c.isalnum() or c in '-_')[:30]}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MANSU_RUNS": str(runs_root()), "MANSU_HOME": str(mansu_home())}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(cwd or Path(__file__).resolve().parent.parent), env=env, start_new_session=True)
    return proc, Launched(proc.pid, list(command), log_path, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def find_run_for_pid(pid: int, root: Path | None = None) -> str | None:
    """The id of the run whose status.json names process `pid` (the run a launch created), if any."""
    for run in list_runs(root):
        if run.status.get("pid") == pid:
            return run.run_id
    return None


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
        elapsed = ((now or dt.datetime.now(dt.timezone.utc)) - started).total_seconds()
        eta = elapsed * (1 - fraction) / fraction
    stage = status.get("stage", "?")
    text = f"{state} · stage {stage}" + (f" · step {step}/{total}" if total else "")
    if eta is not None and state == "running":
        text += f" · ETA {float(eta):.0f} s"
    return Progress(fraction, text, None if eta is None else float(eta), state)


def cancel_run(pid: int, run_id: str | None, root: Path | None = None) -> None:
    """Terminate the backend's process group and mark its run cancelled."""
    try:
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    if run_id is not None:
        from mansu.runs.store import run_dir

        path = run_dir(run_id, root)
        status = read_status(path)
        if status.get("state") in ("running", "failed"):
            write_status(path, str(status.get("stage", "?")), int(status.get("step") or 0),
                         int(status.get("total") or 0), state="cancelled", error="cancelled by the user")


def run_files(run_path: Path) -> dict[str, bool]:
    """Which artifacts a run holds (for 'not computed for this run' messages)."""
    run_path = Path(run_path)
    names = [layout.METRICS, layout.SCORECARD, layout.CIRCUIT, layout.CAD, layout.SURVIVAL, layout.UPDATE, layout.STEPS]
    out = {name: (run_path / name).is_file() for name in names}
    for stage in layout.ATTRIBUTION_STAGES:
        out[f"attribution/{stage}"] = layout.attribution_json(run_path, stage).is_file()
    return out


def exports_dir(run_id: str) -> Path:
    """Where the app writes a run's report and figure images: <MANSU_HOME>/exports/<run_id>."""
    from mansu.runs.store import validate_run_id

    return mansu_home() / "exports" / validate_run_id(run_id)
