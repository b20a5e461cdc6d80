"""The magnitude floor: every updated parameter moves far enough, in its update direction, that its quantized
level changes under every grid the floor targets (`floor_quantizers`, default NF4) -- so the update survives
round-to-nearest quantization by each of them by construction.

For coordinate i with base weight x_i, proposed update p_i, direction s_i = sign(p_i) and the listed grids G:

    w_i      = max_g w_i^g                 bin width of x_i's cell, the widest listed grid's
    mu_i(s)  = max_g mu_i^g(s)             the smallest move changing the level under every grid
    c_i(s)   = min_g c_i^g(s)              the largest move keeping every grid's scales
    n_i = max(kappa * w_i, mu_i(s_i))                                  the floor
    m_i = min( max(|p_i|, n_i),  c_i(s_i) )                            floored magnitude
    delta_i = s_i * m_i,   feasible iff mu_i finite and n_i <= c_i

  w_i^g      grid g's cell width at x_i (nf4: mansu.quant.geometry; others: Quantizer.bin_width).  kappa applies
             to every grid: the move is at least kappa cells of each listed grid (max distributes over the max).
  mu_i^g(s)  the exact smallest move in direction s that changes g's level with g's scales fixed (nf4:
             mansu.quant.geometry.min_move_to_change_code; others: Quantizer.min_move; inf for the elements that
             set a scale -- absmax, or an asymmetric group's min / max -- and where no level is left).  Each grid's
             level is monotone in the weight, so a move >= mu_i^g changes g's level whatever the other grids ask.
  c_i^g(s)   the move that would take x_i to g's scale cap (Quantizer.scale_caps: +-absmax for nf4, fp4 and int8;
             the group's min and max for int4-g128), shrunk by a few ulps: a floored weight never sets a new scale
             of any grid, so every other code of every group stays put.

With floor_quantizers == "nf4" this is exactly the NF4 floor (one grid: the max and min are that grid's values).
Coordinates with mu_i = inf or n_i > c_i cannot be floored (counted as `unfloorable`): the scale-setting elements of
any grid are never moved, and no other coordinate moves (the update is exactly the floored set), so each floored
level change holds under every listed grid's real library (tests/test_floor_quantizers.py); `verify_code_changes`
checks it in pure torch.  A grid that cannot quantize a tensor (int4-g128 on rows that are not a multiple of 128:
deployment keeps such layers in full precision, mansu.quant.alignment.fits) places no constraint on it; a tensor no
listed grid quantizes is unfloorable.  Groups are those of the quantizer's view of each weight
(mansu.quant.targets.QuantLayout: a GPT-2 Conv1D weight is quantized transposed, so its blocks run down the
columns of the stored [in, out] parameter); the geometry comes back indexed in the parameter's own layout.

Memory: FloorGeometry holds 6 fp32 fields, 24 B per circuit coordinate, whatever the number of grids.  It is built
one tensor and one grid at a time: one grid's per-element fields of one tensor (bin width, two moves, two caps:
20 B per weight of that tensor, plus the min_move search's ~40 B per element of a 1M-element chunk) are reduced to
the tensor's circuit coordinates before the next grid is computed.

Under the Fisher budget (mansu.unlearn.fisher.bound_clip) a floored move cannot be scaled down: coordinates are
kept in priority order while 1/2 sum F_i delta_i^2 <= epsilon, the rest are dropped and counted.  That is the
sparsity-permanence tradeoff: few parameters, each moved decisively.

`preview_floor` recomputes the floor for another kappa from the arrays saved in update.safetensors (numpy-free
torch, vectorised; milliseconds on the demo) so the app can show a live preview; those arrays are the combined
(all-grid) geometry, so the preview covers every listed grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import reduce

import torch

from mansu.quant.alignment import fits, parse_quantizers, round_trip
from mansu.quant.geometry import min_move_to_change_code, nf4_geometry
from mansu.quant.nf4 import quantize_nf4
from mansu.quant.registry import get_quantizer
from mansu.quant.targets import NATURAL, QuantLayout
from mansu.unlearn.fisher import bound_clip
from mansu.unlearn.params import ParamIndex

_CAP_SHRINK = 1 - 4e-7  # a few fp32 ulps short of the absmax, so fl(x + move) never ties or passes it


@dataclass(frozen=True)
class FloorGeometry:
    """Flat (circuit-coordinate) geometry of the base weights, all fp32 [n]."""
    x0: torch.Tensor
    bin_width: torch.Tensor
    move_up: torch.Tensor     # min move to change code going up (inf where impossible)
    move_down: torch.Tensor   # ... going down
    cap_up: torch.Tensor      # largest move up keeping |x| below the block absmax
    cap_down: torch.Tensor

    def select(self, idx: torch.Tensor) -> FloorGeometry:
        return FloorGeometry(*(getattr(self, f)[idx] for f in ("x0", "bin_width", "move_up", "move_down", "cap_up",
                                                               "cap_down")))


GridFields = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def grid_fields(quantizer: str, v: torch.Tensor, blocksize: int, name: str) -> GridFields | None:
    """(bin width, move up, move down, cap_lo, cap_hi) of one grid on the view v, fp32 shaped like v (20 B per
    weight); None when the grid cannot quantize v (it stays in full precision).  nf4 honours `blocksize`."""
    if quantizer == "nf4":
        geo = nf4_geometry(v, blocksize, name=name)
        return (geo.bin_width, min_move_to_change_code(v, 1, blocksize, name=name),
                min_move_to_change_code(v, -1, blocksize, name=name), -geo.absmax, geo.absmax)
    qz = get_quantizer(quantizer)
    if not fits(qz, v):
        return None
    cap_lo, cap_hi = qz.scale_caps(v, name=name)
    return qz.bin_width(v, name=name), qz.min_move(v, 1, name=name), qz.min_move(v, -1, name=name), cap_lo, cap_hi


def floor_geometry(params: dict[str, torch.Tensor], index: ParamIndex, blocksize: int = 64, *,
                   layout: QuantLayout = NATURAL, quantizers: str | Sequence[str] = "nf4") -> FloorGeometry:
    """Geometry of the base weights `params` (name -> tensor) at the coordinates of `index`, combined over the
    grids `quantizers` (comma-separated or a sequence of registered names; see the module docstring).

    Groups are formed on the quantizer's view of each weight (`layout`, from `quant_layout(model)`: GPT-2's
    Conv1D weights are quantized transposed); the result is indexed in the parameter's own layout, like `index`."""
    grids = parse_quantizers(quantizers if isinstance(quantizers, str) else ",".join(quantizers))
    fields: dict[str, list[torch.Tensor]] = {k: [] for k in ("x0", "bin", "up", "down", "cap_up", "cap_down")}
    for i, name in enumerate(index.names):
        w = params[name].detach().to(index.device)
        v = layout.view(name, w)  # [out, in]: the quantizers' groups
        x = index.take(i, w.float())
        vpos = None if index.flat_idx[i] is None else view_positions(layout, name, w.shape, index.positions(i))
        per_grid = []
        for q in grids:  # one grid's fields at a time, reduced to the coordinates at once
            g = _grid_at(q, v, vpos, blocksize, name) if vpos is not None else _whole(q, v, blocksize, name, layout)
            if g is not None:
                bin_w, up, down, cap_lo, cap_hi = g
                per_grid.append((bin_w, up, down, ((cap_hi - x) * _CAP_SHRINK).clamp(min=0),
                                 ((x - cap_lo) * _CAP_SHRINK).clamp(min=0)))
        if not per_grid:  # no listed grid quantizes this tensor: nothing to cross, so nothing is floored
            inf = torch.full_like(x, math.inf)
            per_grid.append((torch.zeros_like(x), inf, inf, torch.zeros_like(x), torch.zeros_like(x)))
        fields["x0"].append(x)
        for key, j, combine in (("bin", 0, torch.maximum), ("up", 1, torch.maximum), ("down", 2, torch.maximum),
                                ("cap_up", 3, torch.minimum), ("cap_down", 4, torch.minimum)):
            fields[key].append(reduce(combine, (g[j] for g in per_grid)))
    cat = {k: torch.cat(v) if v else torch.zeros(0, device=index.device) for k, v in fields.items()}
    return FloorGeometry(cat["x0"], cat["bin"], cat["up"], cat["down"], cat["cap_up"], cat["cap_down"])


def view_positions(layout: QuantLayout, name: str, shape: tuple[int, ...], pos: torch.Tensor) -> torch.Tensor:
    """Flat positions in the quantizer's view of the parameter's flat positions `pos` (Conv1D: transposed)."""
    if not layout.is_transposed(name):
        return pos
    rows, cols = shape
    return (pos % cols) * rows + pos // cols


def grid_unit(quantizer: str, v: torch.Tensor, blocksize: int) -> int:
    """Consecutive elements of the view's flat order that share one set of scales under `quantizer` (nf4: the
    floor's blocksize; int8: a row)."""
    size = blocksize if quantizer == "nf4" else get_quantizer(quantizer).group_size
    return size or int(v.shape[-1])


def _grid_at(quantizer: str, v: torch.Tensor, vpos: torch.Tensor | None, blocksize: int,
             name: str) -> GridFields | None:
    """grid_fields of `quantizer` at the view positions `vpos`, flat.  Only the groups holding a position are
    computed: they are gathered into a compact [groups, unit] tensor, which the quantizer treats exactly as in the
    whole weight (its groups are independent), so a step's few candidates cost their groups, not the model."""
    if quantizer != "nf4" and not fits(get_quantizer(quantizer), v):
        return None
    unit = grid_unit(quantizer, v, blocksize)
    if v.numel() % unit:  # a partial last group: the whole weight's fields (rare: odd shapes)
        full = grid_fields(quantizer, v, blocksize, name)
        return None if full is None else tuple(t.reshape(-1)[vpos] for t in full)
    groups, inverse = torch.unique(vpos // unit, return_inverse=True)
    compact = v.reshape(-1, unit)[groups]
    out = grid_fields(quantizer, compact, blocksize, name)
    at = inverse * unit + vpos % unit
    return None if out is None else tuple(t.reshape(-1)[at] for t in out)


def _whole(quantizer: str, v: torch.Tensor, blocksize: int, name: str, layout: QuantLayout) -> GridFields | None:
    """grid_fields of every element, flat in the parameter's own order (a whole-weight index)."""
    out = grid_fields(quantizer, v, blocksize, name)
    return None if out is None else tuple(layout.unview(name, t.reshape(v.shape)).reshape(-1) for t in out)


def floor_moves(proposal: torch.Tensor, bin_width: torch.Tensor, move_up: torch.Tensor, move_down: torch.Tensor,
                cap_up: torch.Tensor, cap_down: torch.Tensor, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(floored signed update [n], feasible mask [n]) for a signed proposal; zero proposals stay zero."""
    up = proposal > 0
    mu = torch.where(up, move_up, move_down)
    cap = torch.where(up, cap_up, cap_down)
    need = torch.maximum(kappa * bin_width, mu)  # the floor proper: kappa bins AND a code change
    m = torch.minimum(torch.maximum(proposal.abs(), need), cap)  # a larger proposal is kept, up to the cap
    feasible = (proposal != 0) & torch.isfinite(mu) & (need <= cap)
    return torch.where(feasible, torch.sign(proposal) * m, torch.zeros_like(m)), feasible


def floor_update(proposal: torch.Tensor, geo: FloorGeometry, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """floor_moves with the geometry of `geo`."""
    return floor_moves(proposal, geo.bin_width, geo.move_up, geo.move_down, geo.cap_up, geo.cap_down, kappa)


def verify_code_changes(base: dict[str, torch.Tensor], updated: dict[str, torch.Tensor],
                        touched: dict[str, torch.Tensor], blocksize: int = 64, *,
                        layout: QuantLayout = NATURAL, quantizer: str = "nf4") -> dict[str, int]:
    """Count touched coordinates whose quantized level under `quantizer` (pure-torch, bit-exact with its library,
    on the quantizer's view `layout`) changed / did not, and untouched coordinates whose level changed (must be 0
    for a floored update).  nf4 compares codes; the other grids compare dequantized values (fp4's codes 0 and 8
    are one level).  Tensors the quantizer cannot group are skipped (they stay in full precision)."""
    changed = unchanged = collateral = 0
    for name, mask in touched.items():
        v0 = layout.view(name, base[name].detach().cpu())
        if quantizer != "nf4" and not fits(get_quantizer(quantizer), v0):
            continue
        v1 = layout.view(name, updated[name].detach().cpu())
        diff = _levels(quantizer, v0, blocksize, name) != _levels(quantizer, v1, blocksize, name)
        m = layout.view(name, mask.cpu().bool()).reshape(-1)
        changed += int((diff & m).sum())
        unchanged += int((~diff & m).sum())
        collateral += int((diff & ~m).sum())
    return {"changed": changed, "unchanged": unchanged, "collateral": collateral}


def _levels(quantizer: str, v: torch.Tensor, blocksize: int, name: str) -> torch.Tensor:
    """Flat per-element quantized state of the view v: nf4 codes, or the other grids' dequantized values."""
    if quantizer == "nf4":
        return quantize_nf4(v, blocksize, name=name).codes.reshape(-1)
    return round_trip(get_quantizer(quantizer), v, blocksize=blocksize, name=name).reshape(-1)


@dataclass(frozen=True)
class FloorPreview:
    kappa: float
    epsilon: float
    n_candidates: int            # coordinates the run proposed to update
    n_updated: int               # floored and inside the Fisher budget
    n_would_change_code: int     # of those, moved past every listed grid's boundary (all, by construction)
    n_unfloored_would_change: int  # candidates whose un-floored proposal alone would change code
    n_unfloorable: int           # no feasible floored move (absmax element, edge cell)
    n_dropped: int               # feasible but outside the Fisher budget
    fisher_budget_used: float    # 1/2 sum F delta^2 / epsilon (0 when epsilon is inf)
    fisher_cost: float
    median_move_over_bin: float

    def to_dict(self) -> dict:
        return asdict(self)


PREVIEW_KEYS = ("proposal", "priority", "bin_width", "move_up", "move_down", "cap_up", "cap_down", "fisher")


def preview_floor(update_tensors: dict[str, torch.Tensor], kappa: float, epsilon: float | None = None) -> FloorPreview:
    """What the floor would do at `kappa` to the candidates saved in update.safetensors (keys `<name>.<field>`,
    fields PREVIEW_KEYS; see docs/unlearning.md).  All candidates are re-selected in one pass in priority order
    (the run selects step by step), so this previews the tradeoff; `run --from-run ID --kappa K` applies it."""
    if not (isinstance(kappa, (int, float)) and 0 < kappa <= 16):
        raise ValueError(f"kappa must be a number in (0, 16], got {kappa!r}")
    cols = {f: _concat(update_tensors, f) for f in PREVIEW_KEYS}
    eps = float(update_tensors["__epsilon__"].item()) if epsilon is None and "__epsilon__" in update_tensors else (
        math.inf if epsilon is None else float(epsilon))
    floored, feasible = floor_moves(cols["proposal"], cols["bin_width"], cols["move_up"], cols["move_down"],
                                    cols["cap_up"], cols["cap_down"], float(kappa))
    bound = bound_clip(floored, cols["fisher"], eps, priority=cols["priority"])
    kept = bound.delta != 0
    mu = torch.where(cols["proposal"] > 0, cols["move_up"], cols["move_down"])
    rel = (bound.delta.abs() / cols["bin_width"].clamp(min=1e-30))[kept]
    n_cand = int((cols["proposal"] != 0).sum())
    return FloorPreview(
        kappa=float(kappa), epsilon=eps, n_candidates=n_cand, n_updated=int(kept.sum()),
        n_would_change_code=int((kept & (bound.delta.abs() >= mu)).sum()),
        n_unfloored_would_change=int(((cols["proposal"] != 0) & (cols["proposal"].abs() >= mu)).sum()),
        n_unfloorable=int(((cols["proposal"] != 0) & ~feasible).sum()), n_dropped=bound.n_dropped,
        fisher_budget_used=bound.budget_used if math.isfinite(eps) else 0.0, fisher_cost=bound.cost,
        median_move_over_bin=float(rel.median()) if rel.numel() else 0.0)


def _concat(tensors: dict[str, torch.Tensor], field: str) -> torch.Tensor:
    parts = [v.reshape(-1).float() for k, v in sorted(tensors.items()) if k.endswith("." + field)]
    if not parts:
        raise ValueError(f"update tensors hold no '.{field}' arrays; expected keys '<param>.{field}' "
                         "as written to update.safetensors by mansu run")
    return torch.cat(parts)
