"""The run store: one folder per run, created atomically, listed, loaded, and honest about dead processes.

A run folder appears under its final name only once its config.json and status.json are complete
(it is built under a hidden temp name and renamed), so a failed start leaves nothing half-written.
A run whose status says "running" but whose process is gone is reported as failed.

Readers are total: a folder whose config.json or status.json is missing, unreadable, not UTF-8 JSON or of the
wrong shape, or whose metrics.json, cad.json or scorecard.json has the wrong shape, loads as state "corrupt" with
the reason, and every other run still lists. metrics.json and cad.json have one writer and one typed reader each
here (`update_metrics`/`read_metrics`, `write_cad`/`read_cad`); scorecard.json's pair lives in mansu.scorecard.

A --from-run child does not copy its parent's circuit and "before" graph: its inherited.json points at them
(`inherit_artifacts`) and `artifact(run, name)` resolves a run's file through that pointer for every reader.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

from mansu.io import read_checked, read_json_object, stamp, write_checked, write_json_atomic
from mansu.paths import runs_root
from mansu.runs import layout
from mansu.scorecard import read_scorecard

RunState = Literal["queued", "running", "finished", "failed", "cancelled"]
CORRUPT = "corrupt"  # the state shown for a folder whose files cannot be read (never written to status.json)
_RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}(-[0-9]{1,3})?-[a-z0-9][a-z0-9_-]{0,63}")  # always fullmatch: "$" lets "\n" in


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def slugify(text: str) -> str:
    """Lower-case, [a-z0-9_-] only, at most 40 characters; empty input gives "run"."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:40]
    return slug or "run"


def validate_run_id(run_id: str) -> str:
    """Accept only ids of the form YYYYMMDD-HHMMSS[-n]-slug: no path separators, no traversal."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
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


def _candidate_ids(slug: str) -> Iterator[str]:
    """YYYYMMDD-HHMMSS-slug, then -1-slug ... -999-slug within the same second."""
    base = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    yield f"{base}-{slugify(slug)}"
    for n in range(1, 1000):
        yield f"{base}-{n}-{slugify(slug)}"


def create_run(config: dict[str, Any], slug: str, root: Path | None = None, *,
               state: RunState = "running") -> Path:
    """Create a run folder holding config.json (stamped) and a fresh status.json; return its path.

    The folder is built under a hidden temp name and renamed into place.  Processes racing for the same id
    (same second, same slug) are told apart by the rename: a non-empty target makes it fail, and the loser
    retries with the next suffix, so concurrent creation never fails and never overwrites a run."""
    root = Path(root or runs_root())
    root.mkdir(parents=True, exist_ok=True)
    base = {**config, "created_at": now_iso(), "versions": library_versions(), "device_info": device_description(),
            "_stamp": stamp()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{slugify(slug)}.", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; a run folder is meant to be readable like any folder
        write_json_atomic(tmp / layout.STATUS, _status_dict("created" if state == "running" else state, 0, 0, state,
                                                            None))
        for run_id in _candidate_ids(slug):
            if (root / run_id).exists():
                continue
            write_json_atomic(tmp / layout.CONFIG, {**base, "run_id": run_id})
            if _rename_into_place(tmp, root / run_id):
                return root / run_id
        raise RuntimeError(f"could not allocate a run id for {slug!r}: 1000 runs with this name in one second")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, target: Path) -> bool:
    """Rename `tmp` to `target`; False when another process took `target` first (non-empty folder there)."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
            return False
        raise
    return True


def _status_dict(stage: str, step: int, total: int, state: RunState, error: str | None) -> dict[str, Any]:
    return {"stage": stage, "step": step, "total": total, "state": state, "error": error,
            "pid": os.getpid(), "host": socket.gethostname(), "updated_at": now_iso()}


def write_status(run: Path, stage: str, step: int = 0, total: int = 0, *,
                 state: RunState = "running", error: str | None = None, **extra: Any) -> None:
    """Record the run's stage and progress; `started_at` is kept from the first write."""
    run = Path(run)
    previous = _read_object_or_empty(run / layout.STATUS)
    status = {**_status_dict(stage, step, total, state, error), **extra}
    status["started_at"] = previous.get("started_at", status["updated_at"])
    write_json_atomic(run / layout.STATUS, status)


def _read_object_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is missing or unreadable (for writers that merge into a file)."""
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return {}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_status(status: dict[str, Any], path: Path) -> dict[str, Any]:
    states = get_args(RunState)
    if status.get("state") not in states:
        raise ValueError(f"{path}: field 'state' must be one of {', '.join(states)}, got {status.get('state')!r}")
    for name in ("stage", "error"):
        value = status.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: field {name!r} must be a string, got {value!r}")
    return status


def _corrupt_status(reason: str) -> dict[str, Any]:
    return {"stage": "unknown", "state": CORRUPT, "error": reason}


def read_status(run: Path) -> dict[str, Any]:
    """status.json, with a dead "running" process reported as failed (never running forever); a missing,
    unreadable or malformed file gives state "corrupt" with the reason (never an exception)."""
    path = Path(run) / layout.STATUS
    try:
        status = _check_status(read_json_object(path), path)
    except (OSError, ValueError) as exc:
        return _corrupt_status(_reason(exc, run))
    if status.get("state") in ("running", "queued") and status.get("host") == socket.gethostname():
        pid = status.get("pid")
        if isinstance(pid, int) and not _process_alive(pid):
            died = f"backend process {pid} died during stage {status.get('stage')!r}"
            status = {**status, "state": "failed", "error": status.get("error") or died}
    return status


def _reason(exc: BaseException, run: Path) -> str:
    """One line naming the file (relative to the run folder) and what is wrong with it."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename:  # raised by the OS: "[Errno 13] ..." names the file apart
        text = f"{exc.filename}: cannot read ({exc.strerror})"
    return text.replace(f"{Path(run)}{os.sep}", "").replace("file not found", "file missing")


# ---------------------------------------------------------------- metrics.json and cad.json: one writer, one reader

class SplitAccuracy(TypedDict, total=False):
    accuracy: float           # in [0, 1]
    ci_low: float
    ci_high: float
    n: int
    fmt: str
    correct: list[int]        # 1/0 per record, for paired comparisons


class StageAccuracy(TypedDict, total=False):
    forget: SplitAccuracy
    retain: SplitAccuracy


class SplitGap(TypedDict, total=False):
    gap: float                # acc(NF4) - acc(fp), paired
    ci_low: float
    ci_high: float
    acc_full: float
    acc_nf4: float
    n: int


class PTQGap(TypedDict, total=False):
    forget: SplitGap
    retain: SplitGap
    mode: str


class Metrics(TypedDict, total=False):
    """metrics.json: accuracy per evaluation stage, the paired PTQ gap, and per-stage summaries."""
    base_fp: StageAccuracy
    base_nf4: StageAccuracy
    unlearned_fp: StageAccuracy
    unlearned_nf4: StageAccuracy
    ptq_gap: PTQGap
    base_alignment: dict[str, Any]
    unlearn: dict[str, Any]
    survival: dict[str, Any]


ACCURACY_STAGES = ("base_fp", "base_nf4", "unlearned_fp", "unlearned_nf4")
SPLITS = ("forget", "retain")


class CadEntry(TypedDict, total=False):
    value: float              # CAD in [0, 1]
    ci_low: float
    ci_high: float
    per_edge: dict[str, float]
    n_examples: int


class CadFile(TypedDict, total=False):
    """cad.json: CAD(before, after) over the original circuit, in full precision and NF4."""
    status: str               # "ok" or "not available" (then `reason` says why)
    reason: str
    after_fp: CadEntry
    after_nf4: CadEntry


CAD_STAGES = ("after_fp", "after_nf4")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(ok: bool, where: str, what: str, value: Any) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(f"{where} must be {what}, got {shown}")


def _check_numbers(entry: Any, where: str, required: str, optional: tuple[str, ...]) -> None:
    _expect(isinstance(entry, dict), where, "a JSON object", entry)
    _expect(_number(entry.get(required)), f"{where}.{required}", "a number", entry.get(required))
    for name in optional:
        value = entry.get(name)
        _expect(value is None or _number(value), f"{where}.{name}", "a number or null", value)


def check_metrics(data: Any, where: str = layout.METRICS) -> Metrics:
    """`data` as Metrics, or a ValueError naming the first field of the wrong shape."""
    _expect(isinstance(data, dict), where, "a JSON object", data)
    for stage in ACCURACY_STAGES:
        if stage in data:
            _expect(isinstance(data[stage], dict), f"{where}: {stage}", "a JSON object", data[stage])
            for split in SPLITS:
                if split in data[stage]:
                    _check_numbers(data[stage][split], f"{where}: {stage}.{split}", "accuracy", ("ci_low", "ci_high"))
    if "ptq_gap" in data:
        _expect(isinstance(data["ptq_gap"], dict), f"{where}: ptq_gap", "a JSON object", data["ptq_gap"])
        for split in SPLITS:
            if split in data["ptq_gap"]:
                _check_numbers(data["ptq_gap"][split], f"{where}: ptq_gap.{split}", "gap", ("ci_low", "ci_high"))
    for key in ("base_alignment", "unlearn", "survival"):
        if key in data:
            _expect(isinstance(data[key], dict), f"{where}: {key}", "a JSON object", data[key])
    return data  # type: ignore[return-value]


def read_metrics(run: Path) -> Metrics:
    """metrics.json of a run ({} when not written yet); a wrong shape raises ValueError naming the field."""
    path = Path(run) / layout.METRICS
    if not path.is_file():
        return {}
    return check_metrics(read_json_object(path), str(path))


def update_metrics(run: Path, key: str, value: Any) -> Metrics:
    """Merge one entry into metrics.json atomically and return the whole mapping (the file's only writer)."""
    path = Path(run) / layout.METRICS
    metrics = {**_read_object_or_empty(path), key: value}
    check_metrics(metrics, f"{path} (writing {key!r})")
    write_json_atomic(path, metrics)
    return metrics  # type: ignore[return-value]


def check_cad(data: Any, where: str = layout.CAD) -> CadFile:
    """`data` as CadFile, or a ValueError naming the first field of the wrong shape."""
    _expect(isinstance(data, dict), where, "a JSON object", data)
    for stage in CAD_STAGES:
        if stage in data:
            entry = data[stage]
            _check_numbers(entry, f"{where}: {stage}", "value", ("ci_low", "ci_high"))
            edges = entry.get("per_edge", {})
            _expect(isinstance(edges, dict) and all(_number(v) for v in edges.values()),
                    f"{where}: {stage}.per_edge", "an object of edge -> number", edges)
    return data  # type: ignore[return-value]


def write_cad(run: Path, cad: dict[str, Any]) -> Path:
    """Write cad.json (stamped) after checking its shape; returns the path."""
    return write_checked(Path(run) / layout.CAD, cad, check_cad)


def read_cad(run: Path) -> CadFile | None:
    """cad.json of a run (None when not written yet); a wrong shape raises ValueError naming the field."""
    return read_checked(Path(run) / layout.CAD, check_cad)


# ---------------------------------------------------------------- listing and loading

@dataclass(frozen=True)
class RunSummary:
    run_id: str
    path: Path
    config: dict[str, Any]
    status: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    scorecard: dict[str, Any] = field(default_factory=dict)
    cad: dict[str, Any] | None = None
    corrupt: str | None = None  # why this folder cannot be read (status shows state "corrupt" with it)


def _load_parts(path: Path) -> dict[str, Any]:
    status = read_status(path)
    if status["state"] == CORRUPT:
        raise ValueError(status["error"])
    return {"config": read_json_object(path / layout.CONFIG), "status": status, "metrics": read_metrics(path),
            "scorecard": read_scorecard(path) or {}, "cad": read_cad(path)}


def load_run(run_id: str, root: Path | None = None) -> RunSummary:
    """Config, status, metrics, scorecard and CAD of one run (optional files not written yet read as empty).

    Never raises for a folder's content: one that cannot be read is returned with `corrupt` set and
    status {"state": "corrupt", "error": reason}; only an invalid or unknown id raises."""
    path = run_dir(run_id, root)
    try:
        return RunSummary(run_id=run_id, path=path, **_load_parts(path))
    except (OSError, ValueError) as exc:
        reason = _reason(exc, path)
        return RunSummary(run_id=run_id, path=path, config={}, status=_corrupt_status(reason), corrupt=reason)


def list_runs(root: Path | None = None) -> list[RunSummary]:
    """All runs, newest first (corrupt ones included, flagged); hidden temp folders and foreign folders are ignored."""
    root = Path(root or runs_root())
    if not root.is_dir():
        return []
    ids = sorted((p.name for p in root.iterdir() if p.is_dir() and _RUN_ID.fullmatch(p.name)), reverse=True)
    return [load_run(run_id, root) for run_id in ids]


def delete_run(run_id: str, root: Path | None = None) -> None:
    """Remove a run folder (validated id only)."""
    shutil.rmtree(run_dir(run_id, root))


# ---------------------------------------------------------------- artifacts a --from-run child shares with its parent

def inherit_artifacts(parent: Path, run: Path, names: list[str]) -> list[str]:
    """Point `run` at `parent`'s artifacts `names` (paths relative to the run folder) instead of copying them:
    inherited.json lists them; `artifact` resolves them.  Returns the names the parent has."""
    parent, run = Path(parent), Path(run)
    present = [name for name in names if artifact(parent, name).is_file()]
    write_json_atomic(run / layout.INHERITED, {"from_run": parent.name, "files": present}, add_stamp=True)
    return present


def artifact(run: Path, name: str | Path) -> Path:
    """The file `name` of a run (relative to its folder, or a path inside it): the run's own when it has one,
    else its parent's when inherited.json lists it (a chain of --from-run children is followed), else the run's
    own (missing) path.  Every reader of a run's files goes through this."""
    run = Path(run)
    rel = Path(name).relative_to(run) if Path(name).is_absolute() else Path(name)
    own = run / rel
    seen = {run.resolve()}
    while not (run / rel).is_file():
        pointer = _read_object_or_empty(run / layout.INHERITED)
        parent_id = pointer.get("from_run")
        if not isinstance(parent_id, str) or rel.as_posix() not in pointer.get("files", []) or \
                not _RUN_ID.fullmatch(parent_id):
            return own
        run = run.parent / parent_id
        if run.resolve() in seen:  # a hand-made cycle: stop
            return own
        seen.add(run.resolve())
    return run / rel


def read_config(run: Path) -> dict[str, Any]:
    """config.json of a run; missing: FileNotFoundError, not a UTF-8 JSON object: ValueError naming the file."""
    return read_json_object(Path(run) / layout.CONFIG)
