"""Atomic artifact writing (temp file + rename) and the provenance stamp every artifact carries.

Artifacts are JSON and safetensors only: no pickle on any path a user file can reach.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mansu import __version__
from mansu.paths import mansu_home, runs_root

SCHEMA_VERSION = 1


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the mansu checkout, or "unknown" outside a git work tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def stamp() -> dict[str, Any]:
    """Provenance fields added to every artifact."""
    return {"schema_version": SCHEMA_VERSION, "mansu_version": __version__, "git_commit": git_commit()}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be readable like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any, *, add_stamp: bool = False) -> None:
    """Write `obj` as sorted, indented JSON via temp file + rename; optionally add the provenance stamp."""
    if add_stamp:
        obj = {**obj, "_stamp": stamp()}
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def save_figure(fig: Any, stem: Path, *, dpi: int = 100, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Save a matplotlib figure as stem.png and stem.svg (each via temp file + rename); the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in formats:
        path = stem.with_suffix(f".{ext}")
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=dpi)
        tmp.replace(path)
        written.append(path)
    return written


def mean_sd(values: Any, fmt: str = "{:.3f}") -> str:
    """'mean ± sd' of the values that are not None ('n/a' for none, the value alone for one)."""
    import statistics

    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.replace('+', '').format(statistics.stdev(vals))}"


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 text of `data` (a leading byte-order mark dropped); anything else is a ValueError naming `where`."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "accepted is UTF-8 encoded JSON") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json.loads would keep the last value silently: ambiguous, so refuse
            raise ValueError(f"duplicated key {key!r} in one JSON object; each key may appear once")
        out[key] = value
    return out


def loads_strict(text: str) -> Any:
    """json.loads that rejects an object with a duplicated key (ValueError; JSONDecodeError for bad syntax)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def read_json(path: Path) -> Any:
    """Read a UTF-8 JSON file; missing: FileNotFoundError; undecodable, malformed or ambiguous: ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    text = decode_utf8(path.read_bytes(), str(path))
    try:
        return loads_strict(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """`read_json` for files that must hold one JSON object (every run-folder JSON file)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def portable_path(value: str) -> str:
    """An absolute path as "$MANSU_HOME/...", "$MANSU_RUNS/..." or its file name, so that exported artifacts never
    carry the machine's absolute paths (user names, mount points); other strings are returned unchanged."""
    if not (isinstance(value, str) and value.startswith(("/", "~")) and "\n" not in value):
        return value
    path = Path(value).expanduser()
    for name, root in (("$MANSU_RUNS", runs_root()), ("$MANSU_HOME", mansu_home())):
        try:
            return f"{name}/{path.resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            continue
    return path.name


def portable_paths(obj: Any) -> Any:
    """`obj` (JSON-like) with every absolute-path string replaced by `portable_path`."""
    if isinstance(obj, dict):
        return {k: portable_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(v) for v in obj]
    return portable_path(obj) if isinstance(obj, str) else obj


def write_safetensors_atomic(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors via temp file + rename; metadata values must be strings."""
    from safetensors.torch import save

    meta = {k: str(v) for k, v in {**stamp(), **(metadata or {})}.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def read_safetensors(path: Path) -> dict:
    """Load tensors saved by `write_safetensors_atomic` onto the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return load_file(str(path))


def _json_default(value: Any) -> Any:
    # numpy/torch scalars and paths appear in metrics; anything else is a bug worth surfacing.
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_checked(path: Path, data: dict[str, Any], check) -> Path:
    """Write one of mansu's own JSON files (stamped) after `check(data, where)` accepts its shape."""
    write_json_atomic(path, dict(check(data, f"{path} (writing)")), add_stamp=True)
    return path


def read_checked(path: Path, check) -> Any | None:
    """One of mansu's own JSON files through its shape check (None when not written yet; ValueError on a wrong
    shape, naming the field)."""
    if not Path(path).is_file():
        return None
    return check(read_json_object(path), str(path))
