"""Circuit-restricted null-space projection (after Geometric-Disentanglement Unlearning, 2025).

With G = [g_1 .. g_k]^T the per-example retain-NLL gradients restricted to the circuit's coordinates ([k, n]):

    P(g) = g - G^T (G G^T)^+ G g

the orthogonal projection off span(g_1 .. g_k), so <P(g), g_j> = 0 for every retain gradient: the retain loss is
unchanged to first order by a step along P(g).  P is idempotent and, working on the restricted vector, zero
outside the circuit by construction.

`RetainProjector` (the engine's projection) keeps the k gradients as they arrive, in bf16 by default, and works
through the k x k Gram matrix G G^T (accumulated in fp64 over column chunks of CHUNK coordinates; the pseudo-
inverse by an eigendecomposition, eigenvalues <= tol^2 * max dropped, i.e. singular values <= tol * max as the QR
rule below, with tol raised to the storage dtype's epsilon: 2^-7 for bf16, where a smaller direction is rounding).
It never forms an orthonormal basis, so nothing of size k x n is built besides the stored rows.

    memory: k x n x 2 B (bf16 rows; 4 B with dtype=float32) + k x k + a k x CHUNK work buffer (64 MB at k=16)
    exactness: P is the exact orthogonal projection off the span of the *stored* rows (to fp32 tolerance): with
    fp32 rows it equals the dense QR projection below; with bf16 rows it equals the QR projection (same tol) of the
    bf16-rounded gradients, and differs from the fp32 one by the rounding (relative ~2^-8 of what is removed).

The dense reference (`orthonormal_basis` + `project_off`): Q = reduced QR of G^T with columns whose |R_jj| <=
tol * max|R_jj| dropped, P(g) = g - Q (Q^T g).  Memory k x n x 4 B for Q, with a construction peak of about
3 x that (stacked rows, QR's output, the column selection): 185 B per coordinate measured at k=16 on the demo
against the projector's 35 B (bench/projection_bench.py).  It is kept for tests and bench/projection_bench.py.
"""

from __future__ import annotations

import math

import torch

# Coordinates per column block: few large ops (on a busy CPU each threaded op can wait for a core), one reused
# k x CHUNK work buffer (64 MB at k = 16 in fp32).
CHUNK = 1 << 20


class RetainProjector:
    """P(g) = g - G^T (G G^T)^+ G g over k stored retain gradients (rows of G in `dtype`, on the CPU, kept as
    contiguous [k, CHUNK] column blocks so each block converts and multiplies at memory speed)."""

    def __init__(self, n: int, k: int, *, dtype: torch.dtype = torch.bfloat16, tol: float = 1e-6):
        self.n, self.k, self.count = n, k, 0
        self.blocks = [torch.empty(k, min(CHUNK, n - lo), dtype=dtype) for lo in range(0, n, CHUNK)]
        self.tol = max(tol, torch.finfo(dtype).eps)  # directions below the storage precision are rounding noise
        # fp32 rows are the exact mode (conditioning up to 1/tol^2 = 1e12): fp64 arithmetic; bf16 rows: fp32
        self.work = torch.float64 if dtype == torch.float32 else torch.float32
        self.whiten: torch.Tensor | None = None  # U [k, r] with G^T U orthonormal, so (G G^T)^+ = U U^T
        self._buf: torch.Tensor | None = None    # [k, min(CHUNK, n)] in `work`: each block converted into it

    @classmethod
    def from_rows(cls, rows: torch.Tensor, **kw) -> RetainProjector:
        proj = cls(rows.shape[1], rows.shape[0], **kw)
        for g in rows:
            proj.add(g)
        return proj.finish()

    @property
    def rank(self) -> int:
        return 0 if self.whiten is None else self.whiten.shape[1]

    @property
    def nbytes(self) -> int:
        rows = sum(b.numel() * b.element_size() for b in self.blocks)
        work = 0 if self._buf is None else self._buf.numel() * self._buf.element_size()
        return rows + work + (0 if self.whiten is None else self.whiten.numel() * 8)

    def add(self, g: torch.Tensor) -> None:
        """Store one retain gradient (flat [n]) as the next row."""
        if self.count >= self.k:
            raise ValueError(f"projector holds {self.k} gradients; got one more")
        flat = g.reshape(-1)
        for lo, block in zip(range(0, self.n, CHUNK), self.blocks):
            block[self.count].copy_(flat[lo: lo + block.shape[1]])
        self.count += 1

    def finish(self) -> RetainProjector:
        """Drop unused rows, build the Gram matrix G G^T block by block (fp64) and U = V diag(lambda^-1/2)."""
        if self.count < self.k:
            self.blocks, self.k = [b[: self.count].clone() for b in self.blocks], self.count
        gram = torch.zeros(self.k, self.k, dtype=torch.float64)
        for block in self.blocks:
            b = block.double()
            gram += b @ b.T
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > self.tol ** 2 * evals.max().clamp(min=1e-300) if self.k else evals.bool()
        self.whiten = evecs[:, keep] / evals[keep].sqrt()
        return self

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P(g) for a flat g [n] (a new tensor, g's dtype)."""
        if self.whiten is None:
            raise RuntimeError("RetainProjector.finish() was not called")
        if self.rank == 0:
            return g.clone()
        c = torch.zeros(self.k, dtype=torch.float64)  # G g
        for lo, rows in self._converted():
            c += (rows @ g[lo: lo + rows.shape[1]].to(self.work)).double()
        w = (self.whiten @ (self.whiten.T @ c)).to(self.work)  # (G G^T)^+ G g
        out = g.clone()
        for lo, rows in self._converted():
            out[lo: lo + rows.shape[1]] -= (rows.T @ w).to(g.dtype)
        return out

    def _converted(self):
        """(offset, block in the work dtype) for each column block, through the one reused buffer."""
        if self._buf is None:
            self._buf = torch.empty(self.k, min(CHUNK, self.n), dtype=self.work)
        for lo, block in zip(range(0, self.n, CHUNK), self.blocks):
            rows = self._buf[:, : block.shape[1]]
            rows.copy_(block)
            yield lo, rows


def orthonormal_basis(gradients: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Q [n, r] (r <= k) with orthonormal columns spanning the rows of `gradients` [k, n]."""
    if gradients.ndim != 2:
        raise ValueError(f"gradients must be [k, n], got shape {tuple(gradients.shape)}")
    q, r = torch.linalg.qr(gradients.float().T, mode="reduced")  # [n, k], [k, k]; fp32 keeps memory k x n x 4 B
    diag = r.diagonal().abs()
    keep = diag > tol * diag.max().clamp(min=1e-300) if diag.numel() else diag.bool()
    return q[:, keep].float()


def project_off(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P(g) = g - Q (Q^T g) for a flat g [n] and basis Q [n, r]."""
    if basis.numel() == 0:
        return g.clone()
    gf = g.float()
    return (gf - basis @ (basis.T @ gf)).to(g.dtype)


def restrict(g: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """g * mask for every masked parameter; parameters without a mask get no update at all."""
    return {n: g[n] * masks[n].to(g[n].device, g[n].dtype) for n in masks if n in g}


class FactoredRetainProjector:
    """The same projection P(g) = g - G^T (G G^T)^+ G g, with each retain gradient kept in factored form.

    A Linear weight's per-example gradient is a sum of per-token outer products, dW = D^T A (Conv1D: A^T D),
    with A [T, fan_in] the layer's inputs and D [T, fan_out] the loss's gradients at its outputs.  Storing A and
    D (tokens whose D is all zero, e.g. padding, dropped) instead of dW makes the projector's memory
    k x T x (fan_in + fan_out) per weight instead of k x fan_in x fan_out:

        memory: k x T x (fan_in + fan_out) x 4 B (the engine's float32; 2 B with bf16) + T x 8 B of example ids per
                weight, on each weight's own device; ~1.2 B per coordinate at k=16, T=64 on Llama-3.1-8B's layout.

    Every product is formed one weight at a time, on its device, without a k x n buffer:
        <dW_i, X>  = sum_t D_i,t^T X A_i,t        (one [kT, fan_out] x [fan_out, fan_in] product per weight)
        sum_i w_i dW_i = (D * w)^T A               (one product per weight)
    so G g costs one product per weight, G^T w another, and the k x k Gram matrix one [kT, kT] product per
    whole weight (a weight under a partial circuit mask: k dense products, once).
    exactness: P is the exact orthogonal projection off the span of the stored factors' gradients restricted to the
    index (pseudo-inverse as in RetainProjector, tol raised to the storage dtype's epsilon): with float32 factors it
    equals the dense QR projection to fp32 tolerance (tests/test_retain_projector.py); with bf16 factors it is the
    exact projection of the rounded factors' gradients.
    """

    def __init__(self, index, transposed: dict[str, bool], k: int, *, dtype: torch.dtype = torch.bfloat16,
                 tol: float = 1e-6):
        self.index, self.transposed, self.k, self.dtype = index, transposed, k, dtype
        self.tol = max(tol, torch.finfo(dtype).eps)
        self.work = torch.float64 if dtype == torch.float32 else torch.float32
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in index.names}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # name -> (A, D, example id)
        self.count = 0
        self.whiten: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.whiten is None else self.whiten.shape[1]

    @property
    def nbytes(self) -> int:
        stored = [t for f in self.factors.values() for t in f] + [t for p in self.parts.values() for f in p for t in f]
        return sum(t.numel() * t.element_size() for t in stored) + (0 if self.whiten is None else
                                                                    self.whiten.numel() * 8)

    def add(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store one example's (A [T, fan_in], D [T, fan_out]) for every weight of the index."""
        if self.count >= self.k:
            raise ValueError(f"projector holds {self.k} gradients; got one more")
        for name in self.index.names:
            if name not in factors or factors[name][1] is None:
                raise ValueError(f"no captured activations/gradients for {name}: the weight was not used")
            a, d = factors[name]
            live = d.abs().amax(dim=1) > 0  # tokens with no gradient add nothing to any product
            self.parts[name].append((a[live].to(self.dtype), d[live].to(self.dtype)))
        self.count += 1

    def finish(self) -> FactoredRetainProjector:
        """Stack each weight's factors, build the Gram matrix G G^T (fp64) and U = V diag(lambda^-1/2)."""
        self.k = self.count
        for name, parts in self.parts.items():
            ids = torch.cat([torch.full((a.shape[0],), j, dtype=torch.long, device=a.device)
                             for j, (a, _) in enumerate(parts)]) if parts else torch.zeros(0, dtype=torch.long)
            a = torch.cat([a for a, _ in parts]) if parts else torch.zeros(0, 0)
            d = torch.cat([d for _, d in parts]) if parts else torch.zeros(0, 0)
            self.factors[name] = (a, d, ids)
        self.parts = {}
        gram = torch.zeros(self.k, self.k, dtype=torch.float64)
        for i, name in enumerate(self.index.names):
            gram += self._gram_part(i, name).double().cpu()
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > self.tol ** 2 * evals.max().clamp(min=1e-300) if self.k else evals.bool()
        self.whiten = evecs[:, keep] / evals[keep].sqrt()
        return self

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P(g) for a flat g [n] over the index (a new tensor, g's dtype and device)."""
        out = g.clone()
        self.project_(out)
        return out

    def project_(self, g: torch.Tensor) -> float:
        """g <- P(g) in place (no second [n] buffer); returns the norm of what was removed, ||g - P(g)||."""
        if self.whiten is None:
            raise RuntimeError("FactoredRetainProjector.finish() was not called")
        if self.rank == 0:
            return 0.0
        c = torch.zeros(self.k, dtype=torch.float64)
        for i, (name, off) in enumerate(zip(self.index.names, self.index.offsets())):
            c += self._inner(name, self._dense(i, g[off: off + self.index.size(i)])).double().cpu()
        w = self.whiten @ (self.whiten.T @ c)  # (G G^T)^+ G g
        removed_sq = 0.0
        for i, (name, off) in enumerate(zip(self.index.names, self.index.offsets())):
            a, _, ids = self.factors[name]
            removed = self.index.take(i, self._combine(name, w.to(device=a.device, dtype=self.work)[ids]))
            removed_sq += float(removed.double().square().sum())
            g[off: off + self.index.size(i)] -= removed.to(device=g.device, dtype=g.dtype)
        return removed_sq ** 0.5

    def _dense(self, i: int, part: torch.Tensor) -> torch.Tensor:
        """Weight i's slice of a flat vector as a dense tensor shaped like the weight, zero outside the index."""
        shape = self.index.shapes[i]
        if self.index.flat_idx[i] is None:
            return part.reshape(shape)
        dense = torch.zeros(math.prod(shape), dtype=part.dtype, device=part.device)
        dense[self.index.positions(i, part.device)] = part
        return dense.reshape(shape)

    def _inner(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """[<dW_j, x>]_j for a dense x shaped like the weight (zero outside the index)."""
        a, d, ids = self.factors[name]
        x = x.to(device=a.device, dtype=self.work)
        a, d = a.to(self.work), d.to(self.work)
        rows = ((a @ x) * d).sum(1) if self.transposed[name] else ((d @ x) * a).sum(1)
        return torch.zeros(self.k, dtype=self.work, device=a.device).index_add_(0, ids, rows)

    def _combine(self, name: str, row_weights: torch.Tensor) -> torch.Tensor:
        """sum over stored tokens of w_row * (outer product), shaped like the weight: sum_j w_j dW_j."""
        a, d, _ = self.factors[name]
        a, d = a.to(self.work), d.to(self.work) * row_weights[:, None]
        return a.T @ d if self.transposed[name] else d.T @ a

    def _gram_part(self, i: int, name: str) -> torch.Tensor:
        """This weight's contribution to G G^T (restricted to the index's coordinates of it)."""
        a, d, ids = self.factors[name]
        onehot = torch.zeros(ids.numel(), self.k, dtype=self.work, device=a.device)
        onehot[torch.arange(ids.numel(), device=a.device), ids] = 1
        if self.index.flat_idx[i] is None:  # whole weight: <dW_i, dW_j> = sum_ts (D_i D_j^T)(A_i A_j^T)
            aw, dw = a.to(self.work), d.to(self.work)
            return onehot.T @ ((dw @ dw.T) * (aw @ aw.T)) @ onehot
        cols = []
        for j in range(self.k):  # partial mask: <M dW_i, M dW_j> = <dW_i, M dW_j>, one masked dW_j at a time
            full = self._combine(name, onehot[:, j])
            masked = torch.zeros_like(full).reshape(-1)
            pos = self.index.positions(i, full.device)
            masked[pos] = full.reshape(-1)[pos]
            cols.append(self._inner(name, masked.reshape(full.shape)))
        return torch.stack(cols, dim=1)
