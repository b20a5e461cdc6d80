"""Circuit: the layered attribution graph of the selected run, by stage, with pruning controls,
a pinned node and its edges, and PNG / SVG / JSON export."""

from pathlib import Path

import pandas as pd
import streamlit as st

from mansu.launch import exports_dir
from mansu.runs import layout
from mansu.runs.store import artifact
from mansu.viz.circuit import circuit_figure, node_edges
from mansu.viz.report import export_images
from ui.state import load_graph, load_json, not_computed, page_preamble, require_run

sel = page_preamble("Circuit")
run = require_run(sel)
if run is None:
    st.stop()

STAGE_LABELS = {"before": "before", "after_fp": "after (fp)", "after_nf4": "after (NF4)"}
stage = st.radio("stage", list(STAGE_LABELS), format_func=STAGE_LABELS.get, horizontal=True, key="circuit-stage")
graph = load_graph(run, stage)
if graph is None:
    not_computed(f"attribution graph '{STAGE_LABELS[stage]}'", run)
    st.stop()

c1, c2, c3 = st.columns([2, 2, 3])
top_n = c1.slider("top-n edges by |score|", 10, 2000, min(300, max(10, graph.n_edges)), step=10, key="circuit-topn")
threshold = c2.number_input("|score| threshold", min_value=0.0, value=0.0, format="%.4g", key="circuit-threshold")
pin_options = ["(none)", *graph.names]
pinned = c3.selectbox("pin node (or click one)", pin_options, key="circuit-pin")

fig = circuit_figure(graph, top_n=top_n, threshold=threshold, pinned=None if pinned == "(none)" else pinned,
                     title=f"{STAGE_LABELS[stage]}: top {top_n} of {graph.n_edges} edges")
chart_key = f"circuit-chart-{stage}"


def _pin_clicked_node() -> None:
    """on_select callback (runs before the rerun, so it may set the pin selectbox's state)."""
    event = st.session_state.get(chart_key)
    points = event.get("selection", {}).get("points", []) if event else []
    clicked = next((p.get("customdata") for p in points if isinstance(p.get("customdata"), str)), None)
    if clicked in graph.names:
        st.session_state["circuit-pin"] = clicked


st.plotly_chart(fig, key=chart_key, on_select=_pin_clicked_node, selection_mode="points", width="stretch",
                config={"scrollZoom": True})

if pinned != "(none)":
    st.subheader(f"edges of {pinned}")
    left, right = st.columns(2)
    left.caption("incoming")
    left.dataframe(pd.DataFrame(node_edges(graph, pinned, "in")), hide_index=True, width="stretch")
    right.caption("outgoing")
    right.dataframe(pd.DataFrame(node_edges(graph, pinned, "out")), hide_index=True, width="stretch")

circuit = load_json(run, layout.CIRCUIT)
if circuit is None:
    not_computed("selected circuit (circuit.json)", run)
else:
    summary = {k: v for k, v in circuit.items() if not isinstance(v, (list, dict))}
    st.caption("selected circuit: " + ", ".join(f"{k} = {v}" for k, v in sorted(summary.items()) if k != "_stamp"))

st.subheader("export")
e1, e3, e2 = st.columns(3)
json_path = artifact(run.path, layout.attribution_json(Path(run.path), stage))
e1.download_button("graph JSON", json_path.read_bytes(), file_name=f"{run.run_id}-{stage}.json",
                   mime="application/json", key="circuit-json")
tracer_path = artifact(run.path, layout.attribution_tracer_json(Path(run.path), stage))
if tracer_path.is_file():  # runs made before this export existed have none
    e3.download_button("circuit-tracer JSON", tracer_path.read_bytes(), key="circuit-tracer-json",
                       file_name=f"{run.run_id}-{stage}.circuit-tracer.json", mime="application/json",
                       help="the circuit's edges in circuit-tracer's graph shape (metadata, nodes, links)")
images_key = f"circuit-images-{run.run_id}-{stage}"  # kept across the rerun a download click triggers
if e2.button("prepare PNG and SVG", key="circuit-images"):
    result = export_images({f"circuit-{stage}": fig}, exports_dir(run.run_id))
    if result.error:
        st.warning(result.error)
    st.session_state[images_key] = [str(path) for path in result.written]
for path in map(Path, st.session_state.get(images_key, [])):
    if path.is_file():
        st.download_button(f"download {path.name}", path.read_bytes(), file_name=path.name, key=f"dl-{path.name}")
