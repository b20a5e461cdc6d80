"""Circuit: the layered attribution graph of the selected run, by stage, pruned on the server (top-k edges by
|score|, the pruned mass reported, a layer's heads grouped when the graph has hundreds of nodes) and drawn as SVG
(WebGL above a few thousand markers);
node search and pinning; the diff of any two stages or runs on one layout with the CAD split; exports of the whole
graph and of the drawn subgraph (circuit-tracer JSON, CSV with node labels, PNG / SVG)."""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from mansu.launch import exports_dir
from mansu.runs import layout
from mansu.runs.store import artifact
from mansu.viz.artifacts import GraphData
from mansu.viz.circuit import SPLIT_RULE, circuit_figure, graph_diff_figure, node_edges
from mansu.viz.graph_ops import (
    GROUP_NODE_LIMIT,
    Pruned,
    align,
    cad_split,
    circuit_edges_of,
    group_by_layer,
    node_label,
    node_split,
    pin_mask,
    pin_subgraph,
    prune,
    search_nodes,
    subgraph_csv,
    subgraph_tracer_json,
)
from mansu.viz.record_spread import edge_spread, per_record_scores, spread_figure
from mansu.viz.report import export_images
from ui import url_state
from ui.node_weights import node_panel
from ui.state import load_graph, load_json, not_computed, page_preamble, picker_labels, require_run, run_name

sel = page_preamble("Circuit")
run = require_run(sel)
if run is None:
    st.stop()

STAGE_LABELS = {"before": "before", "after_fp": "after (fp)", "after_nf4": "after (NF4)"}
VIEWS = {"graph": "one graph", "diff": "diff of two graphs", "spread": "spread over records"}
# each view's state in the URL (?view=graph&stage=&pin=a3.h7,m4&threshold=&topk=, ?view=diff&a=&b=,
# ?view=spread&stage=): a deep link reopens it
_VIEW, _STAGE = (url_state.UrlField("view", "circuit-view", url_state.choice(list(VIEWS))),
                 url_state.UrlField("stage", "circuit-stage", url_state.choice(list(STAGE_LABELS))))
URL_FIELDS = {
    "graph": [_VIEW, _STAGE, url_state.UrlField("pin", "circuit-pins", lambda text: [p for p in text.split(",") if p],
                                                show=lambda pins: ",".join(pins) or None),
              url_state.UrlField("threshold", "circuit-threshold", url_state.number(0.0, float("inf")),
                                 show=lambda t: None if not t else f"{t:g}"),
              url_state.UrlField("topk", "circuit-topn", url_state.number(10, 2000, int))],
    "diff": [_VIEW, url_state.UrlField("a", "diff-a", url_state.choice(list(STAGE_LABELS))),
             url_state.UrlField("b", "diff-b", url_state.choice(list(STAGE_LABELS)))],
    "spread": [_VIEW, _STAGE],
}
url_state.restore([f for fields in URL_FIELDS.values() for f in fields])


def publish_view(name: str) -> None:
    """Write this view's state into the URL and drop the other views' parameters."""
    url_state.publish(URL_FIELDS[name], drop=[f for v, fields in URL_FIELDS.items() if v != name for f in fields])


view = st.radio("view", list(VIEWS), format_func=VIEWS.get, horizontal=True, key="circuit-view")


def graph_version(r, stage_name: str) -> tuple[str, str, int]:
    """(run path, stage, mtime of its graph file): the cache key of everything derived from one stage's graph."""
    path = artifact(r.path, layout.attribution_json(Path(r.path), stage_name))
    return str(r.path), stage_name, path.stat().st_mtime_ns if path.is_file() else -1


# Derived from the cached graphs once per graph version, not on every rerun (a pin, a search, a download click):
# on a 543k-edge graph grouping costs 0.2 s, pruning 0.04 s, the figure 0.1 s, aligning two graphs for a diff 0.1 s.
# Shared read-only across sessions.
@st.cache_resource(show_spinner=False, max_entries=8)
def _grouped(version: tuple, _graph: GraphData) -> GraphData:
    return group_by_layer(_graph)


@st.cache_resource(show_spinner=False, max_entries=32)
def _pruned(version: tuple, grouped: bool, top_k: int, min_score: float, _drawn: GraphData) -> Pruned:
    return prune(_drawn.weight, top_k, min_score)


@st.cache_resource(show_spinner=False, max_entries=8)
def _diff(version_a: tuple, version_b: tuple, circuit: tuple, _a: GraphData, _b: GraphData) -> tuple:
    diff = align(_a, _b, list(circuit))
    return diff, cad_split(diff)


@st.cache_resource(show_spinner=False, max_entries=32)
def _figure(version: tuple, grouped: bool, top_k: int, min_score: float, pinned: tuple, marked: tuple, title: str,
            _drawn: GraphData, _full: GraphData | None):
    return circuit_figure(_drawn, top_n=top_k, threshold=min_score, pinned=list(pinned), highlight=list(marked),
                          full=_full, title=title)


def circuit_edges(r, graph) -> list[tuple[str, str]]:
    """The run's selected circuit (circuit.json, else the graph's own, else the edges CAD was measured on)."""
    cad = load_json(r, layout.CAD) or {}
    return circuit_edges_of(load_json(r, layout.CIRCUIT), graph.meta if graph is not None else None,
                            *(v for v in cad.values() if isinstance(v, dict)))


def diff_view() -> None:
    runs = {run.run_id: run, **({sel.compare.run_id: sel.compare} if sel.compare else {})}
    st.caption("Both graphs on one fixed layout (positions depend only on node names). Pick a comparison run in "
               "the sidebar to diff two runs.")
    cols = st.columns(4)
    labels = picker_labels(list(runs.values()))
    run_a = cols[0].selectbox("graph A: run", list(runs), format_func=labels.get, key="diff-run-a")
    stage_a = cols[1].selectbox("graph A: stage", list(STAGE_LABELS), format_func=STAGE_LABELS.get, key="diff-a")
    run_b = cols[2].selectbox("graph B: run", list(runs), format_func=labels.get, key="diff-run-b")
    stage_b = cols[3].selectbox("graph B: stage", list(STAGE_LABELS), index=1, format_func=STAGE_LABELS.get,
                                key="diff-b")
    a, b = load_graph(runs[run_a], stage_a), load_graph(runs[run_b], stage_b)
    for g, r, s in ((a, run_a, stage_a), (b, run_b, stage_b)):
        if g is None:
            not_computed(f"attribution graph '{STAGE_LABELS[s]}'", runs[r])
    if a is None or b is None:
        return
    c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
    colour = c1.radio("edge colour", ["change", "split"], key="diff-colour", horizontal=True,
                      format_func=lambda c: "signed change" if c == "change" else "CAD split")
    relative = c2.toggle("relative change", key="diff-relative", help="(B − A) / |A|, clipped at ±200%")
    top_n = c3.slider("top-k edges by |change|", 10, 2000, 300, step=10, key="diff-topn")
    query = c4.text_input("search nodes", key="diff-search", placeholder="e.g. a1.h3 or m0")
    diff, split = _diff(graph_version(runs[run_a], stage_a), graph_version(runs[run_b], stage_b),
                        tuple(circuit_edges(runs[run_a], a)), a, b)
    m = st.columns(5)
    m[0].metric("CAD (A → B)", f"{split.cad:.3g}", help="over graph A's run's circuit edges (mansu.attribution.cad)")
    m[1].metric("shrinkage part", f"{split.shrinkage:.3g}", help="|S−T|/(S+T): CAD's lower bound")
    m[2].metric("reversal part", f"{split.reversal:.3g}",
                help="CAD − CAD(−A, B) when the whole circuit flipped sign (the readout reversed), else 0")
    m[3].metric("rerouting part", f"{split.rerouting:.3g}",
                help="CAD − shrinkage − reversal: flips against the circuit's orientation and redistribution")
    m[4].metric("gain outside the circuit", f"{split.outside_gain:.3g}",
                help="Σ max(|t|−|s|, 0) over edges outside the circuit, /(S+T): rerouting CAD does not see")
    if not diff.in_circuit.any():
        st.info("No circuit edges found for graph A's run (circuit.json): the CAD split is 0.")
    fig = graph_diff_figure(diff, colour=colour, relative=relative, top_n=top_n, split=split,
                            highlight=search_nodes(diff.names, query),
                            title=f"{run_name(runs[run_b])} {STAGE_LABELS[stage_b]} vs "
                                  f"{run_name(runs[run_a])} {STAGE_LABELS[stage_a]}")
    st.plotly_chart(fig, key="circuit-diff-chart", width="stretch", config={"scrollZoom": True})
    st.caption("Width = |change| (absolute, or relative to |A|); colour = the sign of the change (green up, purple "
               "down) or, in CAD split mode, the edge's class. " + SPLIT_RULE)
    rows = node_split(diff, split)
    if rows:
        st.caption("CAD split per node (each circuit edge counts at both of its ends)")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


@st.cache_data(show_spinner=False, max_entries=8)
def _per_record(run_path: str, stage: str, mtime: float):
    return per_record_scores(Path(run_path), stage)


def spread_view() -> None:
    """Each strong edge's score on every attribution record: an edge carried by one prompt is not the circuit."""
    c1, c2 = st.columns([3, 2])
    stage = c1.radio("stage", list(STAGE_LABELS), format_func=STAGE_LABELS.get, horizontal=True, key="circuit-stage")
    top_k = c2.slider("edges (top-k by |mean score|)", 5, 60, 20, key="spread-topk")
    path = artifact(run.path, layout.attribution_tensors(Path(run.path), stage))
    data = _per_record(str(run.path), stage, path.stat().st_mtime_ns if path.is_file() else -1)
    graph = load_graph(run, stage)
    if data is None:
        reason = ("this stage has no graph" if graph is None else "its graph was saved without per-record scores "
                  f"(per_example in attribution/{stage}.safetensors, which the pipeline keeps for CAD)")
        st.info(f"per-record edge scores of the '{STAGE_LABELS[stage]}' graph: not computed for this run "
                f"({run.run_id}): {reason}.")
        return
    spread = edge_spread(*data, top_k=top_k, circuit=set(circuit_edges(run, graph)))
    n = spread.scores.shape[0]
    st.plotly_chart(spread_figure(spread, title=f"{STAGE_LABELS[stage]}: the top {len(spread.edges)} edges on each "
                                                f"of {n} records"), key="circuit-spread-chart", width="stretch")
    st.caption("One box per edge, every dot one forget record; the graph's score is their mean. Orange: a single "
               "record carries more than half of the edge's total |score| (one prompt's artefact, not the "
               "circuit); ★ marks circuit edges.")
    st.dataframe(pd.DataFrame(spread.rows()), hide_index=True, width="stretch", key="circuit-spread-table",
                 column_config={c: st.column_config.NumberColumn(format="%.3g") for c in ("mean", "median", "sd")}
                 | {c: st.column_config.NumberColumn(format="%.3g%%") for c in ("same sign %", "top record %")})


if view == "diff":
    diff_view()
    publish_view("diff")
    st.stop()
if view == "spread":
    spread_view()
    publish_view("spread")
    st.stop()

stage = st.radio("stage", list(STAGE_LABELS), format_func=STAGE_LABELS.get, horizontal=True, key="circuit-stage")
graph = load_graph(run, stage)
if graph is None:
    not_computed(f"attribution graph '{STAGE_LABELS[stage]}'", run)
    st.stop()

c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
top_n = c1.slider("top-k edges by |score|", 10, 2000, min(300, max(10, graph.n_edges)), step=10, key="circuit-topn")
threshold = c2.number_input("|score| threshold", min_value=0.0, value=0.0, format="%.4g", key="circuit-threshold")
many = len(graph.names) > GROUP_NODE_LIMIT
grouped = c3.toggle("group heads per layer", value=many, key=f"circuit-group-{many}",
                    help=f"on by default above {GROUP_NODE_LIMIT} nodes: one node per layer's heads, edges summed")
query = c4.text_input("search nodes", key="circuit-search", placeholder="e.g. a3.h7, m12 or a3.")
matches = search_nodes(graph.names, query)
known = set(graph.names)
pins = [p for p in dict.fromkeys(st.session_state.get("circuit-pins") or []) if p in known]  # a link may name others
if query and query != st.session_state.get("_circuit-searched") and matches and (
        len(matches) == 1 or matches[0].lower() == query.strip().lower()) and matches[0] not in pins:
    pins.append(matches[0])                               # a new search naming one node pins it
st.session_state["_circuit-searched"] = query
st.session_state["circuit-pins"] = pins
pins = st.multiselect("pinned nodes (click a node to add it)", graph.names, key="circuit-pins",
                      format_func=lambda n: f"{n} · {node_label(n)}",
                      help="the pinned nodes' edges are highlighted and the rest dimmed; with pins set, the subgraph "
                           "export below is the subgraph of the pins")

version = graph_version(run, stage)
drawn = _grouped(version, graph) if grouped else graph
pruned = _pruned(version, grouped, top_n, threshold, drawn)
if query:
    st.caption(f"search '{query}': {len(matches)} node(s)" + (f": {', '.join(matches[:12])}" if matches else "")
               + ("…" if len(matches) > 12 else ""))
st.caption(pruned.summary() + (f" · {len(graph.names):,} nodes grouped into {len(drawn.names)} (a layer's heads "
                               f"as one node a{{L}}.*, edge scores summed)" if grouped else ""))
highlight = sorted({n.split(".h")[0] + ".*" if grouped and ".h" in n else n for n in matches})
fig = _figure(version, grouped, top_n, threshold, tuple(pins), tuple(highlight),
              f"{STAGE_LABELS[stage]}: top {pruned.kept.shape[0]:,} of {drawn.n_edges:,} edges", drawn,
              graph if grouped else None)
chart_key = f"circuit-chart-{stage}"


def _pin_clicked_node() -> None:
    """on_select callback (runs before the rerun, so it may set the pins and search widgets' state): a node is added
    to the pins; a grouped layer lists its heads in the search box."""
    event = st.session_state.get(chart_key)
    points = event.get("selection", {}).get("points", []) if event else []
    clicked = next((p.get("customdata") for p in points if isinstance(p.get("customdata"), str)), None)
    if clicked in graph.names:
        st.session_state["circuit-search"] = ""
        pinned_now = list(st.session_state.get("circuit-pins") or [])
        st.session_state["circuit-pins"] = pinned_now + ([clicked] if clicked not in pinned_now else [])
    elif clicked and clicked.endswith(".*"):
        st.session_state["circuit-search"] = clicked[:-1] + "h"


st.plotly_chart(fig, key=chart_key, on_select=_pin_clicked_node, selection_mode="points", width="stretch",
                config={"scrollZoom": True})
st.caption("Heads ○, MLPs □, a layer's grouped heads ◇; outlined nodes are in the selected circuit. Hover an edge "
           "near its middle for its score. Blue edges support the answer (positive score), red oppose it.")



def pin_panel(node: str) -> None:
    """A pinned node's edges (incoming, outgoing) and the weights it owns."""
    st.subheader(f"edges of {node} ({node_label(node)})")
    left, right = st.columns(2)
    left.caption("incoming")
    left.dataframe(pd.DataFrame(node_edges(graph, node, "in")), hide_index=True, width="stretch")
    right.caption("outgoing")
    right.dataframe(pd.DataFrame(node_edges(graph, node, "out")), hide_index=True, width="stretch")
    node_panel(run, node, key=f"circuit-node-weights-{node}")


if len(pins) == 1:
    pin_panel(pins[0])
elif pins:  # one tab per pin, the latest pinned first and open
    names = [f"{n} · {node_label(n)}" for n in reversed(pins)]
    # keyed by the pins: a new pin makes new tabs, opened at the default (a kept key would keep the old tab open)
    for tab, node in zip(st.tabs(names, default=names[0], key=f"circuit-pin-tabs-{','.join(pins)}"), reversed(pins)):
        with tab:
            pin_panel(node)
publish_view("graph")

circuit = load_json(run, layout.CIRCUIT)
if circuit is None:
    not_computed("selected circuit (circuit.json)", run)
else:
    summary = {k: v for k, v in circuit.items() if not isinstance(v, (list, dict))}
    st.caption("selected circuit: " + ", ".join(f"{k} = {v}" for k, v in sorted(summary.items()) if k != "_stamp"))

st.subheader("export")
e1, e3, e2 = st.columns(3)
# every export is produced when its button is clicked (a callable), not on every rerun, and the click does not rerun
json_path = artifact(run.path, layout.attribution_json(Path(run.path), stage))
e1.download_button("graph JSON", json_path.read_bytes, file_name=f"{run.run_id}-{stage}.json",
                   mime="application/json", key="circuit-json", on_click="ignore")
tracer_path = artifact(run.path, layout.attribution_tracer_json(Path(run.path), stage))
if tracer_path.is_file():  # runs made before this export existed have none
    e3.download_button("circuit-tracer JSON", tracer_path.read_bytes, key="circuit-tracer-json", on_click="ignore",
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

# the exported subgraph, always on real nodes: with pins, the subgraph of the pins (every edge at a pinned node,
# so every edge among them); else the drawn top-k edges of the ungrouped graph
if pins:
    sub = pin_subgraph(graph, pins, threshold)
    among = int((pin_mask(graph, pins)[graph.src[sub]] & pin_mask(graph, pins)[graph.dst[sub]]).sum())
    st.caption(f"subgraph of the pins: {len(sub):,} edges (every edge of {', '.join(pins)}"
               + (f" with |score| ≥ {threshold:g}" if threshold else "") + f"; {among:,} among the pins), "
               "with node labels")
    slug = f"{run.run_id}-{stage}-pins-{'+'.join(pins)}"[:120]
else:
    sub = _pruned(version, False, top_n, threshold, graph).kept
    st.caption(f"subgraph: {len(sub):,} edges (the top {top_n:,} by |score| of the ungrouped graph), with node "
               "labels; pin nodes to export the subgraph of the pins instead")
    slug = f"{run.run_id}-{stage}-top{top_n}"
s1, s2 = st.columns(2)
edges_of_circuit = circuit_edges(run, graph)
s1.download_button("subgraph: circuit-tracer JSON", lambda: json.dumps(subgraph_tracer_json(graph, sub, slug=slug)),
                   file_name=f"{slug}.circuit-tracer.json", mime="application/json", key="circuit-sub-tracer",
                   on_click="ignore")
s2.download_button("subgraph: CSV", lambda: subgraph_csv(graph, sub, edges_of_circuit), file_name=f"{slug}.csv",
                   mime="text/csv", key="circuit-sub-csv", on_click="ignore")
