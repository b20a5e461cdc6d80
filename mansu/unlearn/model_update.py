"""model_update.safetensors: the unlearned model as a sparse update over its base, enough to rebuild it bit-exactly.

    rebuilt = put_values(align_base(load(base_model), base_alignment), stored values)

Keys, one pair per written parameter (the coordinates the run touched, from the restore buffer of
mansu.unlearn.params.recording):
    <param>.index   int32 (int64 for a tensor of 2^31 or more elements)  sorted flat indices into param.reshape(-1)
    <param>.value   the parameter's dtype, the unlearned values at those indices
A parameter written whole (touched so densely that an index would cost more) has only <param>.value, in its shape.
Metadata: format, base_model (the model as the run names it: a folder or hub id, "demo" for the demo model),
base_alignment, blocksize, dtype, n_coordinates.

Bytes per touched coordinate on disk: 4 (int32 index) + 2 (bf16) or 4 (fp32) = 6 B / 8 B; a whole tensor 2 B / 4 B
per element.  The values are written, not added, so the rebuild is bit-exact (an additive delta is not:
fl(b + fl(n - b)) can differ from n).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mansu.io import read_safetensors, stamp
from mansu.unlearn.params import BaseRestore

FORMAT = "mansu-model-update/1"
_INDEX, _VALUE = ".index", ".value"


def update_values(model: Any, restore: BaseRestore) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """{param: (sorted flat indices or None for the whole tensor, current values there)} of every coordinate
    `restore` saw written (CPU copies, one parameter's touched values at a time)."""
    params = dict(model.named_parameters())
    out = {}
    for name, idx in restore.touched().items():
        flat = params[name].detach().reshape(-1)
        out[name] = (None, flat.cpu().clone()) if idx is None else (idx.cpu(), flat[idx].cpu())
    return out


def write_model_update(path: Path, model: Any, restore: BaseRestore, metadata: dict[str, str]) -> Path:
    """Write the run's touched coordinates and their values (see the module docstring) atomically."""
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    n = 0
    for name, (idx, values) in update_values(model, restore).items():
        if idx is None:
            tensors[name + _VALUE] = values.reshape(params[name].shape).contiguous()
        else:
            small = params[name].numel() < 2 ** 31
            tensors[name + _INDEX] = idx.to(torch.int32 if small else torch.int64).contiguous()
            tensors[name + _VALUE] = values.contiguous()
        n += values.numel()
    meta = {**{k: str(v) for k, v in {**stamp(), **metadata}.items()}, "format": FORMAT, "n_coordinates": str(n)}
    _save_atomic(Path(path), tensors, meta)
    return Path(path)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """safetensors straight to a temp file + rename (no in-memory byte copy of a possibly multi-GB update)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_update(path: Path) -> tuple[dict[str, tuple[torch.Tensor | None, torch.Tensor]], dict[str, str]]:
    """(values for params.put_values, metadata) of a model_update.safetensors; ValueError for another file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model update (runs made before sparse updates saved model/ instead)")
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mansu model update (format {meta.get('format')!r}, expected {FORMAT!r})")
    tensors = read_safetensors(path)
    values = {}
    for key, value in tensors.items():
        if key.endswith(_VALUE):
            name = key[: -len(_VALUE)]
            idx = tensors.get(name + _INDEX)
            values[name] = (None if idx is None else idx.long(), value)
    return values, meta
