"""The run store: one folder per run, created atomically, listed, loaded, and honest about dead processes.

A run folder appears under its final name only once its config.json and status.json are complete
(it is built under a hidden temp name and renamed), so a failed start leaves nothing half-written.
A run whose status says "running" but whose process is gone is reported as failed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mansu.io import read_json, stamp, write_json_atomic
from mansu.paths import runs_root
from mansu.runs import layout

RunState = Literal["running", "finished", "failed", "cancelled"]
_RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}(-[0-9]{1,3})?-[a-z0-9][a-z0-9_-]{0,63}$")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def slugify(text: str) -> str:
    """Lower-case, [a-z0-9_-] only, at most 40 characters; empty input gives "run"."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:40]
    return slug or "run"


def validate_run_id(run_id: str) -> str:
    """Accept only ids of the form YYYYMMDD-HHMMSS[-n]-slug: no path separators, no traversal."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: expected YYYYMMDD-HHMMSS-slug with [a-z0-9_-] only")
    return run_id


def run_dir(run_id: str, root: Path | None = None) -> Path:
    """The folder of an existing run; raises FileNotFoundError when there is none."""
    path = Path(root or runs_root()) / validate_run_id(run_id)
    if not path.is_dir():
        raise FileNotFoundError(f"run {run_id!r} not found under {path.parent}")
    return path


def device_description() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": socket.gethostname(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "bitsandbytes", "captum", "safetensors", "tokenizers", "accelerate"]
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _new_run_id(slug: str, root: Path) -> str:
    base = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run_id = f"{base}-{slugify(slug)}" if n == 0 else f"{base}-{n}-{slugify(slug)}"
        if not (root / run_id).exists():
            return run_id
    raise RuntimeError("could not allocate a run id")


def create_run(config: dict[str, Any], slug: str, root: Path | None = None) -> Path:
    """Create a run folder holding config.json (stamped) and a fresh status.json; return its path."""
    root = Path(root or runs_root())
    root.mkdir(parents=True, exist_ok=True)
    run_id = _new_run_id(slug, root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=root))
    try:
        full = {**config, "run_id": run_id, "created_at": now_iso(), "versions": library_versions(),
                "device_info": device_description(), "_stamp": stamp()}
        write_json_atomic(tmp / layout.CONFIG, full)
        write_json_atomic(tmp / layout.STATUS, _status_dict("created", 0, 0, "running", None))
        os.replace(tmp, root / run_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / run_id


def _status_dict(stage: str, step: int, total: int, state: RunState, error: str | None) -> dict[str, Any]:
    return {"stage": stage, "step": step, "total": total, "state": state, "error": error,
            "pid": os.getpid(), "host": socket.gethostname(), "updated_at": now_iso()}


def write_status(run: Path, stage: str, step: int = 0, total: int = 0, *,
                 state: RunState = "running", error: str | None = None, **extra: Any) -> None:
    """Record the run's stage and progress; `started_at` is kept from the first write."""
    run = Path(run)
    previous = _read_json_or_empty(run / layout.STATUS)
    status = {**_status_dict(stage, step, total, state, error), **extra}
    status["started_at"] = previous.get("started_at", status["updated_at"])
    write_json_atomic(run / layout.STATUS, status)


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(run: Path) -> dict[str, Any]:
    """status.json, with a dead "running" process reported as failed (never running forever)."""
    status = _read_json_or_empty(Path(run) / layout.STATUS)
    if not status:
        return {"stage": "unknown", "state": "failed", "error": "status.json missing or unreadable"}
    if status.get("state") == "running" and status.get("host") == socket.gethostname():
        pid = status.get("pid")
        if isinstance(pid, int) and not _process_alive(pid):
            status = {**status, "state": "failed",
                      "error": status.get("error") or f"backend process {pid} died during stage {status.get('stage')!r}"}
    return status


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    path: Path
    config: dict[str, Any]
    status: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    scorecard: dict[str, Any] = field(default_factory=dict)


def load_run(run_id: str, root: Path | None = None) -> RunSummary:
    """Config, status, metrics and scorecard of one run (missing optional files read as empty)."""
    path = run_dir(run_id, root)
    return RunSummary(run_id=run_id, path=path, config=_read_json_or_empty(path / layout.CONFIG),
                      status=read_status(path), metrics=_read_json_or_empty(path / layout.METRICS),
                      scorecard=_read_json_or_empty(path / layout.SCORECARD))


def list_runs(root: Path | None = None) -> list[RunSummary]:
    """All runs, newest first; hidden temp folders and foreign folders are ignored."""
    root = Path(root or runs_root())
    if not root.is_dir():
        return []
    ids = sorted((p.name for p in root.iterdir() if p.is_dir() and _RUN_ID.match(p.name)), reverse=True)
    return [load_run(run_id, root) for run_id in ids]


def delete_run(run_id: str, root: Path | None = None) -> None:
    """Remove a run folder (validated id only)."""
    shutil.rmtree(run_dir(run_id, root))


def update_metrics(run: Path, key: str, value: Any) -> dict[str, Any]:
    """Merge one entry into metrics.json atomically and return the whole mapping."""
    path = Path(run) / layout.METRICS
    metrics = _read_json_or_empty(path)
    metrics[key] = value
    write_json_atomic(path, metrics)
    return metrics


def read_config(run: Path) -> dict[str, Any]:
    return read_json(Path(run) / layout.CONFIG)
