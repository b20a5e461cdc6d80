"""The flat view of a model's updatable coordinates (a parameter mask per name), the parameter writers and the
restore buffer that lets the unlearning write into the loaded base itself (one model copy at rest).

`ParamIndex` maps the True entries of {name: BoolTensor} masks to one flat vector, so the projection, the
Fisher bound and the floor work on a vector of the circuit's n coordinates (memory k x n, never k x all).
This module is the only place in mansu that writes into model parameters (besides base alignment,
mansu.unlearn.nf4_model): `apply_update` adds a delta, `put_values` writes stored values (restore, rebuild).

While `recording(model)` is active, every write first saves the base value of each coordinate it touches for the
first time (`BaseRestore`, per tensor, on the parameter's own device), so `BaseRestore.revert` puts the base back
bit-exactly.  Restore buffer: 8 B (int64 flat index) + the parameter's dtype (2 B bf16, 4 B fp32) per touched
coordinate, i.e. 10 B (bf16) / 12 B (fp32); a tensor touched so densely that this exceeds a plain copy is kept as
a copy instead (2 B / 4 B per element of that tensor, no index).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mansu.devices import input_device
from mansu.quant.targets import quantizable_parameter_names


@dataclass(frozen=True)
class ParamIndex:
    """The updatable coordinates: per parameter name, the flat positions (param.reshape(-1)) it may change.

    An all-True mask stores no index at all (None: every element, in order); a partial mask stores its sorted
    positions as int32 (4 B per coordinate; int64 only transiently, one tensor at a time).  Flat vectors over the
    index (the engine's state) live on `device`, the model's input device (the GPU for a model on one GPU)."""
    names: tuple[str, ...]
    flat_idx: tuple[torch.Tensor | None, ...]  # sorted int positions into param.reshape(-1), None = all of them
    shapes: tuple[tuple[int, ...], ...]
    device: torch.device = torch.device("cpu")

    def size(self, i: int) -> int:
        idx = self.flat_idx[i]
        return math.prod(self.shapes[i]) if idx is None else idx.numel()

    @property
    def numel(self) -> int:
        return sum(self.size(i) for i in range(len(self.names)))

    def offsets(self) -> list[int]:
        out, total = [], 0
        for i in range(len(self.names)):
            out.append(total)
            total += self.size(i)
        return out

    def positions(self, i: int, device=None) -> torch.Tensor:
        """The int64 flat positions of parameter i (an arange for a full mask), on `device` (default the index's)."""
        device = self.device if device is None else device
        idx = self.flat_idx[i]
        if idx is None:
            return torch.arange(self.size(i), device=device)
        return idx.to(device=device, dtype=torch.long)

    def take(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """The entries of t (shaped like parameter i) at its coordinates, flat, on t's device (a view when full)."""
        flat = t.reshape(-1)
        return flat if self.flat_idx[i] is None else flat[self.positions(i, t.device)]

    def gather(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the masked entries of `tensors` (a missing name reads as zeros) -> fp32 [n] on `device`."""
        out = torch.zeros(self.numel, device=self.device)  # filled slice by slice: no second [n] buffer
        for i, (name, off) in enumerate(zip(self.names, self.offsets())):
            t = tensors.get(name)
            if t is not None:
                out[off: off + self.size(i)].copy_(self.take(i, t.detach()))
        return out

    def scatter(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of gather: {name: dense fp32 tensor shaped like the parameter (on vec's device), zero
        outside the mask}."""
        out = {}
        for i, (name, shape, off) in enumerate(zip(self.names, self.shapes, self.offsets())):
            part = vec[off: off + self.size(i)].float()
            if self.flat_idx[i] is None:
                out[name] = part.reshape(shape)
                continue
            dense = torch.zeros(math.prod(shape), device=vec.device)
            dense[self.positions(i, vec.device)] = part
            out[name] = dense.reshape(shape)
        return out


def compact_index(mask: torch.Tensor) -> torch.Tensor | None:
    """None for an all-True mask, else its sorted flat positions as int32 (int64 past 2^31 elements)."""
    flat = mask.reshape(-1).bool()
    if bool(flat.all()):
        return None
    idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
    return idx.to(torch.int32) if flat.numel() < 2**31 else idx


def index_from_masks(masks: dict[str, torch.Tensor], model=None) -> ParamIndex:
    """A ParamIndex over the True entries of `masks` (names with no True entry are left out); its flat vectors
    live on the model's input device (the CPU without a model)."""
    params = dict(model.named_parameters()) if model is not None else {}
    names, idxs, shapes = [], [], []
    for name in sorted(masks):
        mask = masks[name]
        if params and name not in params:
            raise ValueError(f"mask names unknown parameter {name!r}; masks must be keyed by named_parameters names")
        if params and tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(params[name].shape)}")
        if bool(mask.any()):
            names.append(name)
            idxs.append(compact_index(mask))
            shapes.append(tuple(mask.shape))
    device = input_device(model) if model is not None else torch.device("cpu")
    return ParamIndex(tuple(names), tuple(idxs), tuple(shapes), torch.device(device))


def quantizable_names(model) -> list[str]:
    """Weights NF4 quantizes: every Linear (and GPT-2 Conv1D) weight except the output head, as transformers'
    bitsandbytes loader (mansu.quant.targets owns the list)."""
    return list(quantizable_parameter_names(model))


def full_masks(model, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All-True masks over `names` (default: the quantizable weights): the no-circuit setting."""
    params = dict(model.named_parameters())
    names = quantizable_names(model) if names is None else names
    return {n: torch.ones_like(params[n], dtype=torch.bool, device="cpu") for n in names}


@torch.no_grad()
def apply_update(model, index: ParamIndex, delta: torch.Tensor) -> None:
    """theta[coords of index] += delta (flat [n], in each parameter's dtype and device).

    The one additive parameter writer in mansu (the engine and SSD call it); each write lands on the parameter's
    own device, and a parameter accelerate offloaded (device "meta") is refused with one line.
    """
    params = dict(model.named_parameters())
    restore = _RECORDERS.get(model)
    for i, (name, off) in enumerate(zip(index.names, index.offsets())):
        p = params[name]
        d = delta[off: off + index.size(i)]
        nonzero = d != 0
        if not bool(nonzero.any()):
            continue
        _require_in_memory(name, p)
        full = index.flat_idx[i] is None
        if restore is not None:
            dense = full and bool(nonzero.all())
            restore.save(name, p, None if dense else index.positions(i, p.device)[nonzero.to(p.device)])
        if full:
            p.view(-1).add_(d.to(device=p.device, dtype=p.dtype))
        else:
            p.view(-1).index_add_(0, index.positions(i, p.device), d.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def put_values(model, values: dict[str, tuple[torch.Tensor | None, torch.Tensor]]) -> None:
    """theta[name][idx] = value for {name: (flat long idx or None for the whole tensor, values)}: writes stored
    values exactly (no add, so no rounding), on each parameter's own device.  Recorded like `apply_update`."""
    params = dict(model.named_parameters())
    restore = _RECORDERS.get(model)
    for name, (idx, value) in values.items():
        if name not in params:
            raise ValueError(f"update names unknown parameter {name!r}; the base model does not have it")
        p = params[name]
        _require_in_memory(name, p)
        if restore is not None:
            restore.save(name, p, idx)
        if idx is None:
            p.copy_(value.reshape(p.shape).to(device=p.device, dtype=p.dtype))
        else:
            p.view(-1)[idx.to(device=p.device, dtype=torch.long)] = value.to(device=p.device, dtype=p.dtype)


def _require_in_memory(name: str, p: torch.Tensor) -> None:
    if p.device.type == "meta":
        raise ValueError(f"parameter {name} is offloaded by accelerate (device_map put it on disk or CPU offload); "
                         "mansu writes updates into parameters in place and cannot update offloaded weights: give "
                         "the devices more memory or use --device cpu/cuda")


@dataclass
class BaseRestore:
    """The base values of every coordinate written while recording: {name: (sorted int64 flat idx on the
    parameter's device, or None for a whole-tensor copy; base values in the parameter's dtype)}.

    Bytes per touched coordinate: 8 (index) + 2 (bf16) or 4 (fp32); whole-tensor copies 2 or 4 per element."""
    saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)

    @torch.no_grad()
    def save(self, name: str, p: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Keep the current (base) values of `p` at `idx` (None: every coordinate) not saved before."""
        flat = p.detach().view(-1)
        old = self.saved.get(name)
        if old is not None and old[0] is None:
            return
        if idx is None:
            self.saved[name] = (None, self._whole(flat, old))
            return
        idx = idx.to(device=p.device, dtype=torch.long)
        if old is not None:
            idx = idx[~torch.isin(idx, old[0])]
            if not idx.numel():
                return
            idx, vals = torch.cat([old[0], idx]), torch.cat([old[1], flat[idx]])
        else:
            vals = flat[idx].clone()
        if idx.numel() * (8 + flat.element_size()) >= flat.numel() * flat.element_size():
            self.saved[name] = (None, self._whole(flat, (idx, vals)))
            return
        order = torch.argsort(idx)
        self.saved[name] = (idx[order], vals[order])

    @staticmethod
    def _whole(flat: torch.Tensor, old: tuple[torch.Tensor | None, torch.Tensor] | None) -> torch.Tensor:
        """A copy of the tensor's base values: the current values with the already-saved base ones put back."""
        whole = flat.clone()
        if old is not None:
            whole[old[0]] = old[1]
        return whole

    def touched(self) -> dict[str, torch.Tensor | None]:
        """{name: sorted flat indices written (None: the whole tensor)}."""
        return {name: idx for name, (idx, _) in self.saved.items()}

    def base_tensor(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """The base value of parameter `name` given its current value (a new tensor when `name` was written)."""
        if name not in self.saved:
            return current.detach()
        idx, vals = self.saved[name]
        if idx is None:
            return vals.view(current.shape)
        base = current.detach().clone()
        base.view(-1)[idx] = vals
        return base

    def base_view(self, model, names: Sequence[str]) -> Mapping[str, torch.Tensor]:
        """{name: base value} for `names`, built one tensor at a time on access (on the parameter's device), never
        all at once."""
        return _BaseView(self, dict(model.named_parameters()), tuple(names))

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() + (0 if i is None else i.numel() * 8) for i, v in self.saved.values())

    def revert(self, model) -> None:
        """Write the saved base values back (bit-exact) and forget them."""
        saved, self.saved = self.saved, {}
        with _paused(model):
            put_values(model, saved)


class _BaseView(Mapping):
    def __init__(self, restore: BaseRestore, params: dict[str, torch.Tensor], names: tuple[str, ...]):
        self.restore, self.params, self.names = restore, params, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.restore.base_tensor(name, self.params[name])  # on the parameter's device (GPU work at 8B)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


_RECORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its active BaseRestore


@contextlib.contextmanager
def recording(model, restore: BaseRestore | None = None) -> Iterator[BaseRestore]:
    """Save the base value of every coordinate written into `model` inside the block (see `BaseRestore`)."""
    restore = restore if restore is not None else BaseRestore()
    previous = _RECORDERS.get(model)
    _RECORDERS[model] = restore
    try:
        yield restore
    finally:
        _set(model, previous)


@contextlib.contextmanager
def _paused(model) -> Iterator[None]:
    previous = _RECORDERS.pop(model, None)
    try:
        yield
    finally:
        _set(model, previous)


def _set(model, restore: BaseRestore | None) -> None:
    if restore is None:
        _RECORDERS.pop(model, None)
    else:
        _RECORDERS[model] = restore


def sub_index(index: ParamIndex, positions: torch.Tensor) -> tuple[ParamIndex, torch.Tensor]:
    """The ParamIndex of some flat positions of `index` (sorted, explicit int64 indices), and the sorted positions."""
    positions = torch.sort(positions.long()).values
    names, idxs, shapes = [], [], []
    for i, (name, shape, off) in enumerate(zip(index.names, index.shapes, index.offsets())):
        sel = positions[(positions >= off) & (positions < off + index.size(i))] - off
        if sel.numel():
            names.append(name)
            idxs.append(sel if index.flat_idx[i] is None else index.positions(i, sel.device)[sel])
            shapes.append(shape)
    return ParamIndex(tuple(names), tuple(idxs), tuple(shapes), positions.device), positions
