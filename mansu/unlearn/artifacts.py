"""update.safetensors: the update and everything the floor preview needs, for the candidate coordinates.

Keys (every array flat, one entry per stored coordinate, same order within a parameter):
    <param>.index      int64  flat index into the parameter (param.reshape(-1))
    <param>.delta      fp32   the applied cumulative update (0: proposed but not applied -- dropped)
    <param>.proposal   fp32   the un-floored signed proposal (the direction the method wanted)
    <param>.priority   fp32   the selection score (|projected forget gradient| for MANSU)
    <param>.bin_width  fp32   bin width of the base weight (weight units; the widest of the floor's grids)
    <param>.move_up / .move_down  fp32  exact smallest move changing the level on every floor grid (inf: impossible)
    <param>.cap_up / .cap_down    fp32  largest move keeping every floor grid's scales (e.g. |w| below the absmax)
    <param>.fisher     fp32   retain diagonal Fisher (0 when the method did not compute it)
    __epsilon__, __kappa__  fp32 [1]  the run's Fisher budget and floor
Metadata: method, n_candidates_total, n_stored, truncated ("1" when only the top max_coords by priority are kept).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mansu.io import write_safetensors_atomic
from mansu.quant.targets import NATURAL, QuantLayout
from mansu.unlearn.floor import floor_geometry
from mansu.unlearn.params import sub_index


def update_tensors(base_params: dict[str, torch.Tensor], result, epsilon: float, kappa: float, blocksize: int,
                   fisher: torch.Tensor | None, max_coords: int = 200_000, *, layout: QuantLayout = NATURAL,
                   quantizers: str = "nf4") -> tuple[dict[str, torch.Tensor], dict]:
    """The update.safetensors dict for an UnlearnResult (see the module docstring); the geometry is the floor's
    over the grids `quantizers` (UnlearnConfig.floor_quantizers)."""
    top = result.proposals(max_coords)
    truncated = top.n_total > max_coords
    order = torch.argsort(top.positions)
    sub, pos = sub_index(result.index, top.positions[order].cpu())  # only the stored coordinates come to the CPU

    def at(flat: torch.Tensor) -> torch.Tensor:
        return flat[pos.to(flat.device)].float().cpu()

    geo = floor_geometry(base_params, sub, blocksize, layout=layout, quantizers=quantizers)
    cols = {"delta": at(result.delta), "proposal": top.proposal[order].cpu(), "priority": top.priority[order].cpu(),
            "bin_width": geo.bin_width, "move_up": geo.move_up, "move_down": geo.move_down, "cap_up": geo.cap_up,
            "cap_down": geo.cap_down, "fisher": at(fisher) if fisher is not None else torch.zeros(pos.numel())}
    out: dict[str, torch.Tensor] = {}
    for name, idx, off in zip(sub.names, sub.flat_idx, sub.offsets()):
        out[f"{name}.index"] = idx.long().cpu()
        for key, col in cols.items():
            out[f"{name}.{key}"] = col[off: off + idx.numel()].float().contiguous()
    out["__epsilon__"] = torch.tensor([epsilon], dtype=torch.float32)
    out["__kappa__"] = torch.tensor([kappa], dtype=torch.float32)
    meta = {"n_candidates_total": str(top.n_total),
            "n_stored": str(int(pos.numel())), "truncated": "1" if truncated else "0"}
    return out, meta


def write_update(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    write_safetensors_atomic(Path(path), tensors, metadata)
