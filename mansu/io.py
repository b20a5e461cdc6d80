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
    from mansu import __version__

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


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing file raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return json.loads(path.read_text())


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
