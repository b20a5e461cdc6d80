"""The magnitude-floor preview: calls the backend's `preview_floor` on the run's cached update."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import streamlit as st

from mansu.runs.store import RunSummary
from mansu.unlearn.floor import preview_floor
from ui.state import load_update


def preview(run: RunSummary, kappa: float) -> tuple[dict[str, Any] | None, float, str | None]:
    """(FloorPreview's fields, seconds, message) for the run's update at this kappa."""
    tensors = load_update(run)
    if tensors is None:
        return None, 0.0, "update.safetensors: not computed for this run"
    import torch

    # One intra-op thread: the preview is ~10 vectorised passes over 1e5 elements, and on a busy machine (the
    # backend runs beside the app) OpenMP threads waiting on each other cost 10x more than they save.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        result = preview_floor(tensors, kappa)
    except ValueError as exc:
        return None, 0.0, f"floor preview: {exc}"
    elapsed = time.perf_counter() - t0
    return dataclasses.asdict(result), elapsed, None  # a FloorPreview, the one shape preview_floor returns


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def show_preview(fields: dict[str, Any], elapsed: float) -> None:
    """The preview as metrics (scalar fields only), with its latency."""
    scalars = [(k, v) for k, v in fields.items() if isinstance(v, (int, float, str, bool))]
    cols = st.columns(min(4, max(1, len(scalars))))
    for i, (key, value) in enumerate(scalars):
        cols[i % len(cols)].metric(key.replace("_", " "), _fmt(value))
    st.caption(f"preview computed in {elapsed * 1000:.0f} ms")
