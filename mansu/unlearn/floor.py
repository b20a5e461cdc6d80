"""The NF4 magnitude floor: every updated parameter moves far enough, in its update direction, that its NF4
code changes -- so the update survives 4-bit quantization by construction.

For coordinate i with base weight x_i (block absmax a_b, not the absmax element), proposed update p_i and
direction s_i = sign(p_i):

    n_i = max(kappa * w_i, mu_i(s_i))                                  the floor
    m_i = min( max(|p_i|, n_i),  c_i(s_i) )                            floored magnitude
    delta_i = s_i * m_i,   feasible iff mu_i finite and n_i <= c_i

  w_i      NF4 bin width of x_i's cell in weight units (mansu.quant.geometry)
  mu_i(s)  the exact smallest move in direction s that changes the code with the absmax fixed
           (mansu.quant.geometry.min_move_to_change_code; inf for absmax elements, code 15 up, code 0 down)
  c_i(s)   the move that would take |x_i + delta_i| to the block absmax a_b (shrunk by a few ulps): a floored
           weight never becomes its block's new absmax, so the block's scale -- and every other code of the
           block -- stays put.

Coordinates with mu_i = inf or n_i > c_i cannot be floored (counted as `unfloorable`).  Block absmax elements
are never moved, and no other coordinate moves (the update is exactly the floored set), so each floored code
change holds under the real bitsandbytes quantizer; `verify_code_changes` checks it.  Blocks are those of the
quantizer's view of each weight (mansu.quant.targets.QuantLayout: a GPT-2 Conv1D weight is quantized transposed,
so its blocks run down the columns of the stored [in, out] parameter); the geometry comes back indexed in the
parameter's own layout.

Under the Fisher budget (mansu.unlearn.fisher.bound_clip) a floored move cannot be scaled down: coordinates are
kept in priority order while 1/2 sum F_i delta_i^2 <= epsilon, the rest are dropped and counted.  That is the
sparsity-permanence tradeoff: few parameters, each moved decisively.

`preview_floor` recomputes the floor for another kappa from the arrays saved in update.safetensors (numpy-free
torch, vectorised; milliseconds on the demo) so the app can show a live preview.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from mansu.quant.geometry import min_move_to_change_code, nf4_geometry
from mansu.quant.nf4 import quantize_nf4
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


def floor_geometry(params: dict[str, torch.Tensor], index: ParamIndex, blocksize: int = 64, *,
                   layout: QuantLayout = NATURAL) -> FloorGeometry:
    """Geometry of the base weights `params` (name -> tensor) at the coordinates of `index`.

    NF4 blocks are formed on the quantizer's view of each weight (`layout`, from `quant_layout(model)`: GPT-2's
    Conv1D weights are quantized transposed); the result is indexed in the parameter's own layout, like `index`."""
    fields: dict[str, list[torch.Tensor]] = {k: [] for k in ("x0", "bin", "up", "down", "cap_up", "cap_down")}
    for name, idx in zip(index.names, index.flat_idx):
        w = params[name].detach().cpu()
        v = layout.view(name, w)  # [out, in]: bitsandbytes' blocks

        def at(t: torch.Tensor) -> torch.Tensor:  # per-element field of the view -> the coordinates of idx
            return layout.unview(name, t.reshape(v.shape)).reshape(-1)[idx]

        geo = nf4_geometry(v, blocksize, name=name)
        x = w.reshape(-1).float()[idx]
        a = at(geo.absmax)
        fields["x0"].append(x)
        fields["bin"].append(at(geo.bin_width))
        fields["up"].append(at(min_move_to_change_code(v, 1, blocksize, name=name)))
        fields["down"].append(at(min_move_to_change_code(v, -1, blocksize, name=name)))
        fields["cap_up"].append(((a - x) * _CAP_SHRINK).clamp(min=0))
        fields["cap_down"].append(((x + a) * _CAP_SHRINK).clamp(min=0))
    cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in fields.items()}
    return FloorGeometry(cat["x0"], cat["bin"], cat["up"], cat["down"], cat["cap_up"], cat["cap_down"])


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
                        layout: QuantLayout = NATURAL) -> dict[str, int]:
    """Count touched coordinates whose NF4 code (pure-torch, bit-exact with bitsandbytes, on the quantizer's view
    `layout`) changed / did not, and untouched coordinates whose code changed (must be 0 for a floored update)."""
    changed = unchanged = collateral = 0
    for name, mask in touched.items():
        c0 = quantize_nf4(layout.view(name, base[name].detach().cpu()), blocksize).codes
        c1 = quantize_nf4(layout.view(name, updated[name].detach().cpu()), blocksize).codes
        diff = c0 != c1
        m = layout.view(name, mask.cpu().bool()).reshape(-1)
        changed += int((diff & m).sum())
        unchanged += int((~diff & m).sum())
        collateral += int((diff & ~m).sum())
    return {"changed": changed, "unchanged": unchanged, "collateral": collateral}


@dataclass(frozen=True)
class FloorPreview:
    kappa: float
    epsilon: float
    n_candidates: int            # coordinates the run proposed to update
    n_updated: int               # floored and inside the Fisher budget
    n_would_change_code: int     # of those, moved past their NF4 boundary (all of them, by construction)
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
