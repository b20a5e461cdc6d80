"""Spread over records: each edge's score on every attribution record, so one prompt's artefact is not mistaken
for the circuit.

A graph's edge score is the mean over its records of the per-record score (mansu.attribution.eap; the pipeline
keeps them, `per_example` [n, U, V] in attribution/<stage>.safetensors, for CAD's bootstrap).  For the top-k edges
by |mean| this module returns the per-record scores and, per edge:

    same sign     the fraction of records whose score has the mean's sign
    top share     max_i |s_i| / sum_i |s_i|: the largest single record's part of the edge's total |score|
    one record    top share > ONE_RECORD (the edge is mostly one prompt's)

Memory: the stage's per-record scores are read whole (4 B per record per node pair, n x U x V), then only the
top-k columns are kept (4 B per record per kept edge).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from mansu.runs import layout
from mansu.runs.store import artifact

ONE_RECORD = 0.5


@dataclass(frozen=True)
class EdgeSpread:
    """Per-record scores of the strongest edges of one graph."""

    edges: list[tuple[str, str]]   # [k] (upstream, downstream), strongest mean first
    scores: np.ndarray             # [n_records, k] float
    in_circuit: np.ndarray         # [k] bool

    @property
    def mean(self) -> np.ndarray:
        return self.scores.mean(0)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per edge (see the module docstring)."""
        mean, total = self.mean, np.abs(self.scores).sum(0)
        same = (np.sign(self.scores) == np.sign(mean)).mean(0)
        share = np.divide(np.abs(self.scores).max(0), total, out=np.zeros_like(total), where=total > 0)
        return [{"edge": f"{u} → {v}", "in circuit": bool(c), "mean": float(m),
                 "median": float(np.median(self.scores[:, j])), "sd": float(self.scores[:, j].std(ddof=1))
                 if self.scores.shape[0] > 1 else None, "same sign %": 100 * float(same[j]),
                 "top record %": 100 * float(share[j]), "one record": bool(share[j] > ONE_RECORD)}
                for j, ((u, v), m, c) in enumerate(zip(self.edges, mean, self.in_circuit))]


def per_record_scores(run_dir: Path, stage: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray] | None:
    """(upstream, downstream, per-record scores [n, U, V], valid [U, V]) of one stage, or None when the stage has
    no graph or kept no per-record scores."""
    import json

    from safetensors import safe_open

    tensors = artifact(run_dir, layout.attribution_tensors(Path(run_dir), stage))
    meta_path = artifact(run_dir, layout.attribution_json(Path(run_dir), stage))
    if not tensors.is_file() or not meta_path.is_file():
        return None
    with safe_open(str(tensors), framework="np") as fh:
        if "per_example" not in fh.keys():
            return None
        per_record, valid = fh.get_tensor("per_example"), fh.get_tensor("valid").astype(bool)
    meta = json.loads(meta_path.read_text())
    return meta["upstream"], meta["downstream"], per_record, valid


def edge_spread(upstream: list[str], downstream: list[str], per_record: np.ndarray, valid: np.ndarray, *,
                top_k: int = 20, circuit: set[tuple[str, str]] | frozenset = frozenset()) -> EdgeSpread:
    """The top_k existing edges by |mean over records| with their per-record scores."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    us, vs = np.nonzero(valid)
    flat = per_record[:, us, vs]                                          # [n, E]
    order = np.argsort(-np.abs(flat.mean(0)), kind="stable")[:top_k]
    edges = [(upstream[us[j]], downstream[vs[j]]) for j in order]
    return EdgeSpread(edges, flat[:, order].astype(np.float64), np.array([e in circuit for e in edges], dtype=bool))


def spread_figure(spread: EdgeSpread, *, title: str = "") -> go.Figure:
    """One horizontal box per edge (strongest at the top) with every record as a point; edges a single record
    dominates are drawn in orange, circuit edges are starred."""
    rows = spread.rows()
    fig = go.Figure()
    for j, row in reversed(list(enumerate(rows))):
        label = row["edge"] + (" ★" if row["in circuit"] else "")
        colour = "#ff7f0e" if row["one record"] else "#1f77b4"
        fig.add_trace(go.Box(x=spread.scores[:, j], name=label, boxpoints="all", jitter=0.4, pointpos=0,
                             marker={"color": colour, "size": 6}, line={"color": colour}, showlegend=False,
                             hovertemplate=f"{row['edge']}<br>record score %{{x:.3g}}<extra></extra>"))
    fig.add_vline(x=0.0, line={"color": "grey", "dash": "dot"})
    n = spread.scores.shape[0]
    fig.update_layout(title=title or f"per-record edge scores ({n} records)", height=max(320, 28 * len(rows) + 120),
                      xaxis={"title": "edge score on one record"}, yaxis={"title": ""}, margin={"l": 160})
    return fig
