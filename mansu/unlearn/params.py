"""The flat view of a model's updatable coordinates (a parameter mask per name) and the one parameter writer.

`ParamIndex` maps the True entries of {name: BoolTensor} masks to one flat vector, so the projection, the
Fisher bound and the floor work on a vector of the circuit's n coordinates (memory k x n, never k x all).
`apply_update` is the only function in mansu that writes into model parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mansu.quant.targets import quantizable_parameter_names


@dataclass(frozen=True)
class ParamIndex:
    names: tuple[str, ...]
    flat_idx: tuple[torch.Tensor, ...]  # long indices into param.reshape(-1), one per name
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return int(sum(i.numel() for i in self.flat_idx))

    def offsets(self) -> list[int]:
        out, total = [], 0
        for i in self.flat_idx:
            out.append(total)
            total += i.numel()
        return out

    def gather(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the masked entries of `tensors` (a missing name reads as zeros) -> fp32 [n]."""
        parts = []
        for name, idx in zip(self.names, self.flat_idx):
            t = tensors.get(name)
            if t is None:
                parts.append(torch.zeros(idx.numel()))
            elif idx.numel() == t.numel():  # a full mask: no gather
                parts.append(t.detach().reshape(-1).float().cpu())
            else:
                parts.append(t.detach().reshape(-1)[idx.to(t.device)].float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0)

    def scatter(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of gather: {name: dense tensor shaped like the parameter, zero outside the mask}."""
        out = {}
        for name, idx, shape, off in zip(self.names, self.flat_idx, self.shapes, self.offsets()):
            numel = int(torch.tensor(shape).prod().item()) if shape else 1
            if idx.numel() == numel:
                out[name] = vec[off: off + numel].float().reshape(shape)
                continue
            dense = torch.zeros(numel)
            dense[idx] = vec[off: off + idx.numel()].float()
            out[name] = dense.reshape(shape)
        return out


def index_from_masks(masks: dict[str, torch.Tensor], model=None) -> ParamIndex:
    """A ParamIndex over the True entries of `masks`; names with no True entry are left out."""
    params = dict(model.named_parameters()) if model is not None else {}
    names, idxs, shapes = [], [], []
    for name in sorted(masks):
        mask = masks[name]
        if params and name not in params:
            raise ValueError(f"mask names unknown parameter {name!r}; masks must be keyed by named_parameters names")
        if params and tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(params[name].shape)}")
        idx = torch.nonzero(mask.reshape(-1).bool(), as_tuple=False).reshape(-1)
        if idx.numel():
            names.append(name)
            idxs.append(idx)
            shapes.append(tuple(mask.shape))
    return ParamIndex(tuple(names), tuple(idxs), tuple(shapes))


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

    The ONE place in mansu that writes into model parameters (the engine, SSD and base alignment all call it).
    """
    params = dict(model.named_parameters())
    for name, idx, off in zip(index.names, index.flat_idx, index.offsets()):
        p = params[name]
        d = delta[off: off + idx.numel()]
        if not bool((d != 0).any()):
            continue
        if idx.numel() == p.numel():
            p.view(-1).add_(d.to(device=p.device, dtype=p.dtype))
        else:
            p.view(-1).index_add_(0, idx.to(p.device), d.to(device=p.device, dtype=p.dtype))


def sub_index(index: ParamIndex, positions: torch.Tensor) -> tuple[ParamIndex, torch.Tensor]:
    """The ParamIndex of some flat positions of `index` (sorted), and the sorted positions themselves."""
    positions = torch.sort(positions.long()).values
    names, idxs, shapes = [], [], []
    for name, idx, shape, off in zip(index.names, index.flat_idx, index.shapes, index.offsets()):
        sel = positions[(positions >= off) & (positions < off + idx.numel())] - off
        if sel.numel():
            names.append(name)
            idxs.append(idx[sel])
            shapes.append(shape)
    return ParamIndex(tuple(names), tuple(idxs), tuple(shapes)), positions
