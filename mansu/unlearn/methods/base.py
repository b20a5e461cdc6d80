"""What every unlearning method shares: the `Method` base class, the optimizers that return a step instead of
writing it, the non-finite-loss check, and the errors a method raises.

A method is one small class with `prepare()` (one-time statistics) and `step(i) -> (delta [n], stats)`; the loop
in `mansu.unlearn.engine` applies each step through `params.apply_update` (the only parameter writer).  Class
attributes say what the rest of mansu needs to know about it (name, circuit restriction, the config fields it
reads, its demo-world settings), so every list of methods derives from the registry in `methods/__init__.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mansu.devices import input_device
from mansu.unlearn import objectives as obj
from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.data import TokenBatch, batch_indices
from mansu.unlearn.params import ParamIndex, full_masks, index_from_masks, quantizable_names

# Fields every method reads (the Launch form always shows them).
COMMON_FIELDS = ("steps", "batch_size", "seed")


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient: the run stops at `step` before applying it."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at unlearning step {step}; the run stopped before applying it")
        self.step, self.value = step, value


class EmptyCircuitError(ValueError):
    pass


class FloorNotMetError(ValueError):
    pass


class Adam:
    """Plain Adam on a flat vector, returning the step instead of writing it (bias-corrected).  State m and v in
    fp32 on `device`: 8 B/coordinate (bf16 moments would stall: v's 1e-3 increments are below bf16's resolution)."""

    def __init__(self, n: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, device=None):
        self.m, self.v, self.t = torch.zeros(n, device=device), torch.zeros(n, device=device), 0
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps

    def step(self, g: torch.Tensor) -> torch.Tensor:
        """-lr * mhat / (sqrt(vhat) + eps) in a new [n] buffer (g is left as it was)."""
        return self.step_(g.clone())

    def step_(self, g: torch.Tensor) -> torch.Tensor:
        """The same step written into g's own buffer once the moments have read it: no [n] temporary."""
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        denom = torch.sqrt(self.v, out=g).div_(math.sqrt(1 - self.b2 ** self.t)).add_(self.eps)
        return torch.div(self.m, denom, out=denom).mul_(-self.lr / (1 - self.b1 ** self.t))


class Sgd:
    """delta = -lr * g (no state)."""

    def __init__(self, lr: float):
        self.lr = lr

    def step(self, g: torch.Tensor) -> torch.Tensor:
        return -self.lr * g

    def step_(self, g: torch.Tensor) -> torch.Tensor:
        return g.mul_(-self.lr)


def make_optimizer(config: UnlearnConfig, n: int, lr: float | None = None, device=None) -> Adam | Sgd:
    lr = config.lr if lr is None else lr
    return Adam(n, lr, device=device) if config.optimizer == "adam" else Sgd(lr)


RECORD_CHUNK = 1 << 24  # coordinates per chunk of a step's bookkeeping (64 MB of fp32)
TOPK_DIRECT = 1 << 24  # torch.topk on CPU keeps a (value, index) pair per element (16 B each): only this far
SELECT_CHUNK = 1 << 22  # elements per chunk of the radix selection beyond it (32 MB of int64 keys)


class ChunkedScore:
    """A flat [n] score that is never held whole: `values(key)` computes its entries at a slice or an index tensor
    from the vectors it is made of.  top_indices selects from it a chunk at a time (its radix passes compute each
    chunk again: five elementwise passes instead of an [n] buffer of 4 B per entry)."""

    def __init__(self, n: int, values: Callable[[slice | torch.Tensor], torch.Tensor], device: torch.device):
        self.n, self.values, self.device = n, values, device

    def numel(self) -> int:
        return self.n

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        return self.values(key)

    def count_nonzero(self) -> int:
        return sum(int(torch.count_nonzero(self[lo: lo + SELECT_CHUNK])) for lo in chunks(self.n, SELECT_CHUNK))


def top_indices(score: torch.Tensor | ChunkedScore, k: int, *, direct_limit: int | None = None) -> torch.Tensor:
    """Indices of the k largest entries of a flat score, largest first.

    Up to `direct_limit` entries: torch.topk (a ChunkedScore is computed whole first).  Beyond it, a radix
    selection (4 passes of 8-bit histograms over order-preserving int keys, then one collecting pass), a chunk at a
    time: ~0 B per entry beyond one chunk, where torch.topk would hold 16 B per entry (the 304M-coordinate GradDiff
    run's peak).  Ties at the k-th value go to the lowest indices."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    if score.numel() <= (TOPK_DIRECT if direct_limit is None else direct_limit):
        return torch.topk(score[:] if isinstance(score, ChunkedScore) else score, k).indices
    k = min(k, score.numel())
    threshold, n_ties = _kth_key(score, k)
    above, ties = [], []
    for lo, key in _keys(score):
        above.append(torch.nonzero(key > threshold).reshape(-1) + lo)
        if n_ties > 0:
            eq = torch.nonzero(key == threshold).reshape(-1)[:n_ties] + lo
            n_ties -= eq.numel()
            ties.append(eq)
    idx = torch.cat(above + ties)
    return idx[torch.sort(score[idx].float(), descending=True, stable=True).indices]


def _keys(score: torch.Tensor):
    """(offset, int64 key) per chunk: the float32 bit pattern mapped so that keys order as the values do."""
    for lo in chunks(score.numel(), SELECT_CHUNK):
        bits = score[lo: lo + SELECT_CHUNK].float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        yield lo, torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def _kth_key(score: torch.Tensor, k: int) -> tuple[int, int]:
    """(the k-th largest key, how many entries equal to it belong to the top k)."""
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.long, device=score.device)
        for _, key in _keys(score):
            if shift < 24:
                key = key[(key >> (shift + 8)) == prefix]
            counts += torch.bincount((key >> shift) & 255, minlength=256)
        above = counts.flip(0).cumsum(0).flip(0) - counts   # entries in higher bins of this prefix
        b = int(torch.nonzero(above < remaining).min())     # the bin holding the remaining-th largest
        remaining -= int(above[b])
        prefix = (prefix << 8) | b
    return prefix, remaining


def chunks(n: int, size: int = RECORD_CHUNK) -> range:
    """Start offsets of the chunks of a flat [n] vector that the step's bookkeeping works through one at a time."""
    return range(0, n, size)


def abs_score(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|g| in `dtype`, cast a chunk at a time (no fp32 [n] temporary before a bf16 score)."""
    out = torch.empty(g.numel(), dtype=dtype, device=g.device)
    for lo in chunks(g.numel()):
        out[lo: lo + RECORD_CHUNK] = g[lo: lo + RECORD_CHUNK].abs()
    return out


def all_finite(g: torch.Tensor) -> bool:
    """No NaN or Inf in g, checked a chunk at a time (torch.isfinite over all of g costs ~7 B per coordinate in
    temporaries: the step's peak at scale)."""
    return all(bool(torch.isfinite(g[lo: lo + RECORD_CHUNK]).all()) for lo in chunks(g.numel()))


def check_finite(loss: torch.Tensor, g: torch.Tensor | None, step: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value) or (g is not None and not all_finite(g)):
        raise NonFiniteLossError(step, value if not math.isfinite(value) else float("nan"))


@dataclass(frozen=True)
class Proposals:
    """The proposed (or updated) coordinates a run keeps for the floor tuner, highest priority first when cut."""
    positions: torch.Tensor  # int64 flat positions in the index
    proposal: torch.Tensor   # fp32: the first un-floored signed move proposed there
    priority: torch.Tensor   # fp32: its largest selection score
    n_total: int             # how many coordinates were proposed or updated in all (before the cut)


class Method:
    """Shared plumbing: batches, the forget objectives, stats bookkeeping.

    Per-coordinate state, on the index's device (the model's): the cumulative update `total` (fp32, 4 B), the
    first proposal and the priority (fp32, 4 B each, for MANSU, whose floor tuner replays them through the floor
    and the Fisher bound exactly; bf16, 2 B each, for the other methods, where they only rank and preview).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""                    # one line for --help and the app's picker
    circuit_restricted: ClassVar[bool] = False     # updates only the circuit's coordinates when a circuit exists
    fields: ClassVar[tuple[str, ...]] = ()         # UnlearnConfig fields it reads beyond COMMON_FIELDS
    demo: ClassVar[dict[str, Any]] = {}            # its settings on the demo world (unlearn/demo_settings.py)
    proposal_dtype: ClassVar[torch.dtype] = torch.bfloat16
    # state (total 4 + proposal/priority 4 + Adam 8) + a step's gradient and delta (8): mansu/memory.py's estimate
    peak_bytes_per_coordinate: ClassVar[int] = 24

    @classmethod
    def peak_bytes(cls, config: UnlearnConfig) -> float:
        """Peak engine bytes per coordinate under these settings (mansu/memory.py's estimate)."""
        return cls.peak_bytes_per_coordinate

    def __init__(self, model, forget: TokenBatch, retain: TokenBatch, config: UnlearnConfig, index: ParamIndex):
        self.model, self.forget, self.retain, self.config, self.index = model, forget, retain, config, index
        self.device = input_device(model)
        self.n = index.numel
        self.state_device = index.device
        self.total = self.zeros()  # the cumulative applied update (the engine adds each step's delta)
        self.init_proposals()
        self.fisher: torch.Tensor | None = None
        self.ref: torch.Tensor | None = None
        self.cache: dict | None = None  # shared across runs on the same base weights (compare), keyed by settings

    @classmethod
    def coordinates(cls, model, config: UnlearnConfig, masks: dict[str, torch.Tensor] | None) -> ParamIndex:
        """The coordinates the method may update: every quantizable Linear weight, or the circuit's."""
        quant = quantizable_names(model)
        if not (cls.circuit_restricted and masks is not None):
            return index_from_masks(full_masks(model, quant), model)
        index = index_from_masks({n: m for n, m in masks.items() if n in set(quant)}, model)
        if index.numel == 0:
            raise EmptyCircuitError(f"empty circuit: its masks cover 0 quantizable weights ({len(masks)} masks, "
                                    f"{sum(int(m.sum()) for m in masks.values())} entries, none in the "
                                    f"{len(quant)} Linear weights NF4 quantizes); widen the circuit selection")
        return index

    def init_proposals(self) -> None:
        """Dense first-proposal and priority vectors (a method that proposes few coordinates keeps a sparse log)."""
        self.proposal = self.zeros(self.proposal_dtype)
        self.priority = self.zeros(self.proposal_dtype)

    def zeros(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat [n] state vector on the index's device."""
        return torch.zeros(self.n, dtype=dtype, device=self.state_device)

    def cached(self, key, compute):
        if self.cache is None:
            return compute()
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def prepare(self) -> None:
        pass

    def batch(self, which: str, step: int) -> tuple[TokenBatch, list[int]]:
        data = self.forget if which == "forget" else self.retain
        idx = batch_indices(len(data), self.config.batch_size, step, self.config.seed + (0 if which == "forget" else 7))
        return data.select(idx).to(self.device), idx

    def forget_loss(self, step: int, kind: str) -> torch.Tensor:
        fb, idx = self.batch("forget", step)
        if kind == "ga":
            return obj.ga_loss(self.model, fb)
        if kind == "npo":
            return obj.npo_loss(self.model, fb, self.ref[idx].to(self.device), self.config.beta)
        if kind == "simnpo":
            return obj.simnpo_loss(self.model, fb, self.config.beta, self.config.simnpo_gamma)
        raise ValueError(f"unknown forget objective {kind!r}: accepted are ga, npo, simnpo")

    def retain_loss(self, step: int) -> torch.Tensor:
        rb, _ = self.batch("retain", step)
        return obj.nll_loss(self.model, rb)

    def ensure_ref(self) -> None:
        if self.ref is None:
            self.ref = obj.reference_logprobs(self.model, self.forget.to(self.device)).cpu()

    def release(self) -> None:
        """Drop what only the steps need once they are done (Adam's moments, 8 B per coordinate); the cumulative
        update and the proposals stay for the artifacts and the floor tuner."""
        self.opt = None

    def proposals(self, limit: int) -> Proposals:
        """At most `limit` proposed-or-updated coordinates, by priority (see `Proposals`)."""
        score = self.priority.clone()  # -inf where nothing was proposed; built a chunk at a time
        n_total = 0
        for lo in chunks(self.n):
            proposed = (self.proposal[lo: lo + RECORD_CHUNK] != 0) | (self.total[lo: lo + RECORD_CHUNK] != 0)
            n_total += int(torch.count_nonzero(proposed))
            score[lo: lo + RECORD_CHUNK].masked_fill_(~proposed, -math.inf)
        if n_total > limit:
            pos = top_indices(score, limit)
        else:
            pos = torch.nonzero(score > -math.inf).reshape(-1)
        return Proposals(pos, self.proposal[pos].float(), self.priority[pos].float(), n_total)

    def record_proposal(self, delta: torch.Tensor, score: torch.Tensor) -> None:
        """Keep each coordinate's first proposed move and its largest priority (the floor tuner's input), a chunk
        at a time (the comparison and the casts then cost a chunk, not [n] bytes)."""
        for lo in chunks(self.n):
            hi = min(lo + RECORD_CHUNK, self.n)
            proposal = self.proposal[lo:hi]
            torch.where(proposal == 0, delta[lo:hi].to(proposal.dtype), proposal, out=proposal)
            torch.maximum(self.priority[lo:hi], score[lo:hi].to(self.priority.dtype), out=self.priority[lo:hi])

    def step(self, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
