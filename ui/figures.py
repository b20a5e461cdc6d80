"""The figures of a run for the report (the same builders the pages use)."""

from __future__ import annotations

import plotly.graph_objects as go

from mansu.runs import layout
from mansu.runs.store import RunSummary
from mansu.viz import survival as sv
from mansu.viz.circuit import circuit_figure, diff_figure
from mansu.viz.compare import cad_figure, cad_value, forget_drop, fp_nf4_bars, quadrant_figure
from ui.state import run_name, load_graph, load_json


def run_figures(run: RunSummary, others: list[RunSummary]) -> tuple[dict[str, go.Figure], list[str]]:
    """(figures by title, notes about what is missing) for the report."""
    figs: dict[str, go.Figure] = {}
    missing: list[str] = []
    before = load_graph(run, "before")
    for stage in ("before", "after_fp", "after_nf4"):
        graph = before if stage == "before" else load_graph(run, stage)
        if graph is None:
            missing.append(f"attribution {stage}")
        else:
            figs[f"circuit {stage}"] = circuit_figure(graph, top_n=200, title=f"circuit {stage}")
            if stage != "before" and before is not None:
                figs[f"diff before vs {stage}"] = diff_figure(before, graph, top_n=200)
    surv = load_json(run, layout.SURVIVAL)
    hist = sv.histogram_of(sv.overall(surv), sv.shared_edges(surv)) if isinstance(surv, dict) else None
    if hist is None:
        missing.append("survival under NF4")
    else:
        figs["update vs NF4 bin width"] = sv.histogram_figure({run_name(run): hist})
        rows = sv.by_kind_and_layer(sv.per_tensor(surv)) or {run_name(run): sv.per_layer(surv)}
        if any(rows.values()):
            figs["NF4 codes changed"] = sv.code_change_heatmap(rows)
    cad = run.cad  # checked by mansu.runs.store.read_cad when the run was loaded
    if cad is None:
        missing.append("CAD")
    else:
        figs["CAD"] = cad_figure(cad)
    with_metrics = [r for r in [run, *others] if r.metrics]
    if with_metrics:
        figs["fp vs NF4 accuracy"] = fp_nf4_bars({f"{run_name(r)}": r.metrics for r in with_metrics})
        points = {}
        for r in with_metrics:
            drop, c = forget_drop(r.metrics, "nf4"), cad_value(r.cad, "nf4")
            if drop is not None and c is not None:
                points[f"{run_name(r)}"] = (drop, c[0])
        if points:
            figs["suppression vs erasure (NF4)"] = quadrant_figure(points, drop_margin=0.2)
    else:
        missing.append("evaluation metrics")
    return figs, missing
