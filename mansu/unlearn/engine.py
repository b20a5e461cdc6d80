"""The unlearning loop: any registered method (mansu.unlearn.methods.METHODS) behind one interface, the same
per-step stats.

    run_unlearning(model, forget, retain, config, masks=None, on_step=None) -> UnlearnResult

The loop builds the method, lets it `prepare()`, then for each step takes its `(delta, stats)`, applies delta
through `params.apply_update` (the only parameter writer) and reports the stats.  The methods' equations are in
their own modules (methods/mansu.py for MANSU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mansu.unlearn.config import UnlearnConfig
from mansu.unlearn.data import TokenBatch
from mansu.unlearn.methods import METHODS
from mansu.unlearn.methods.base import EmptyCircuitError, FloorNotMetError, NonFiniteLossError, Proposals
from mansu.unlearn.params import ParamIndex, apply_update

__all__ = ["EmptyCircuitError", "FloorNotMetError", "NonFiniteLossError", "UnlearnResult", "run_unlearning"]


@dataclass
class UnlearnResult:
    index: ParamIndex
    delta: torch.Tensor                 # cumulative applied update, flat fp32 [n] on the index's device
    steps: list[dict]
    proposals: Callable[[int], Proposals]  # limit -> the top proposed coordinates (their first un-floored move, and
                                           # |projected forget gradient| or |update| when proposed)
    fisher: torch.Tensor | None         # retain diagonal Fisher over the coordinates, when the method computed it
    summary: dict = field(default_factory=dict)


def run_unlearning(model, forget: TokenBatch, retain: TokenBatch, config: UnlearnConfig,
                   masks: dict[str, torch.Tensor] | None = None,
                   on_step: Callable[[dict], None] | None = None, cache: dict | None = None) -> UnlearnResult:
    """Unlearn in place (callers pass a copy); returns the cumulative update and per-step stats.

    `cache` (optional) shares base-weight statistics (retain Fisher/basis, NF4 geometry) between runs that start
    from the same base weights; pass a fresh dict per base."""
    cls = METHODS[config.method]
    index = cls.coordinates(model, config, masks)
    torch.manual_seed(config.seed)
    method = cls(model, forget, retain, config, index)
    method.cache = cache
    t0 = time.perf_counter()
    method.prepare()
    prep = time.perf_counter() - t0
    total, steps = method.total, []
    state = state_bytes(method)
    for i in range(config.steps):
        t = time.perf_counter()
        delta, stats = method.step(i)
        apply_update(model, index, delta)
        total += delta
        del delta  # a step's delta is transient: only the cumulative update is state
        record = {"step": i, "method": config.method, **stats, "update_norm": float(total.norm()),
                  "n_nonzero": int(torch.count_nonzero(total)), "step_seconds": round(time.perf_counter() - t, 4)}
        steps.append(record)
        if on_step:
            on_step(record)
    summary = {"prepare_seconds": round(prep, 3), "loop_seconds": round(time.perf_counter() - t0 - prep, 3),
               "n_coordinates": index.numel, "n_params_touched": int(torch.count_nonzero(total))}
    state = max(state, state_bytes(method))
    method.release()
    summary.update(state_bytes=state, state_bytes_per_coordinate=round(state / max(index.numel, 1), 2))
    return UnlearnResult(index, total, steps, method.proposals, method.fisher, summary)


_NOT_STATE = ("model", "forget", "retain", "config", "cache")  # inputs and shared caches, not the method's state


def state_bytes(method) -> int:
    """Bytes of the engine's per-run state: the index's flat indices and every tensor the method holds (the
    cumulative update among them), one level into its optimizer, floor geometry and projector (lists and dicts of
    tensors included); each storage once."""
    seen: dict[int, int] = {}

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)
        elif isinstance(value, dict):
            for v in value.values():
                add(v)

    add(method.index.flat_idx)
    for name, value in vars(method).items():
        if name in _NOT_STATE or isinstance(value, torch.nn.Module):
            continue
        add(value)
        if hasattr(value, "__dict__") and not isinstance(value, torch.Tensor):
            for inner in vars(value).values():
                add(inner)
    return sum(seen.values())
