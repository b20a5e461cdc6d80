"""The "weights under the circuit" panel: what unlearning did to the weights a node owns (mansu.viz.node_weights),
shared by the Circuit page (the pinned node) and the Update vs NF4 page (the per-node table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from mansu.runs import layout
from mansu.runs.store import RunSummary
from mansu.viz import survival as sv
from mansu.viz.graph_ops import node_label
from mansu.viz.node_weights import NodeWeightReport, node_edge_scores
from ui.state import load_graph

STAGE_COLUMNS = {"before": "before", "after_fp": "after (fp)", "after_nf4": "after (NF4)"}
NO_WEIGHTS = ("input", "logits")


@st.cache_resource(show_spinner="rebuilding the base and measuring each node's weights…", max_entries=4)
def _report_cached(run_path: str, mtime: float) -> NodeWeightReport | str:
    from mansu.viz.node_weights import node_weight_report

    try:
        return node_weight_report(Path(run_path))
    except (FileNotFoundError, ValueError, OSError) as exc:  # said on the page, in the stored words
        return str(exc)


def load_report(run: RunSummary) -> NodeWeightReport | str:
    """The run's per-node report (cached on model_update.safetensors' path + mtime), or why there is none."""
    path = Path(run.path) / layout.MODEL_UPDATE
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return (f"{path.name} is missing: this run stored no model update (a run made before sparse updates, or "
                "a run that never reached its unlearning stage)")
    return _report_cached(str(run.path), mtime)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}%"


def quantizer_rows(report: NodeWeightReport, node: str) -> list[dict[str, Any]]:
    w = report.nodes[node]
    return [{"quantizer": q, "codes changed": w.codes_changed[q] if w.coverage[q] else None,
             "% of its weights": w.codes_changed_pct(q), "weights it quantizes": w.coverage[q]}
            for q in report.quantizers]


def node_panel(run: RunSummary, node: str, *, key: str) -> None:
    """Everything about one node's weights: counts, codes changed per quantizer, the |delta|/bin histogram and its
    edges' scores before and after."""
    st.subheader(f"weights under {node} ({node_label(node)})")
    if node in NO_WEIGHTS:
        st.info(f"{node} owns no weights: embeddings, norms and the unembedding are never part of a circuit.")
        return
    report = load_report(run)
    if isinstance(report, str):
        st.info(f"weights under the circuit: not computed for this run ({run.run_id}): {report}")
        return
    if node not in report.nodes:
        st.info(f"{node} is not a head or MLP of this run's model.")
        return
    w = report.nodes[node]
    m = st.columns(4)
    m[0].metric("weights owned", f"{w.owned:,}")
    share = {"delta_color": "off", "delta_arrow": "off", "delta_description": "of its weights"}
    m[1].metric("touched by unlearning", f"{w.touched:,}", delta=_pct(100 * w.touched / w.owned) if w.owned else None,
                help="coordinates the run wrote (model_update.safetensors)", **share)
    m[2].metric("NF4 codes changed", f"{w.codes_changed['nf4']:,}", delta=_pct(w.codes_changed_pct("nf4")),
                help="owned weights whose 4-bit code differs after unlearning, updated or not", **share)
    m[3].metric("median |delta| / NF4 bin", "–" if w.median_ratio is None else f"{w.median_ratio:.3g}",
                help="below 1: most updates are too small to change a code under NF4")
    left, right = st.columns(2)
    left.caption(f"codes changed per quantizer (base alignment: {report.base_alignment})")
    left.dataframe(pd.DataFrame(quantizer_rows(report, node)), hide_index=True, width="stretch",
                   column_config={"% of its weights": st.column_config.NumberColumn(format="%.3g%%")},
                   key=f"{key}-quant")
    hist = sv.histogram_of(report.histogram_entry(node)) if w.ratio_counts else None
    if hist is None:
        right.info(f"no weight of {node} was updated, so there is no |delta| / bin histogram.")
    else:
        fig = sv.histogram_figure({node: hist}, title=f"|delta| / NF4 bin width of {node}'s {w.updated:,} "
                                                      "updated weights")
        right.plotly_chart(fig, key=f"{key}-hist", width="stretch")
    graphs = {s: load_graph(run, s) for s in STAGE_COLUMNS}
    rows = node_edge_scores(graphs, node)
    st.caption(f"edges of {node}: score before and after unlearning (strongest before first)")
    if rows:
        table = pd.DataFrame(rows).rename(columns=STAGE_COLUMNS)
        st.dataframe(table, hide_index=True, width="stretch", key=f"{key}-edges",
                     column_config={c: st.column_config.NumberColumn(format="%.3g") for c in STAGE_COLUMNS.values()})
    else:
        st.info(f"no attribution graph of this run names {node}.")


def node_table(report: NodeWeightReport, *, touched_only: bool) -> pd.DataFrame:
    """The per-node breakdown: one row per node, percentages of its own weights."""
    return pd.DataFrame(report.rows(touched_only=touched_only))
