"""Update vs NF4: |delta| / bin-width histograms (log x, the 1.0 line), per layer and overall,
overlaid per run; the per-layer heatmap of NF4 codes changed; the headline; the per-node breakdown of what
unlearning did to each head's and MLP's weights; the live magnitude-floor preview and "apply and evaluate"."""

import streamlit as st

from mansu.pipeline import child_spec
from mansu.runs import layout
from mansu.viz import quant as vq
from mansu.viz import survival as sv
from ui import launch as ui_launch
from ui import url_state
from ui.floor import preview, show_preview
from ui.node_weights import load_report, node_panel, node_table
from ui.state import load_json, not_computed, page_preamble, require_run, run_name

sel = page_preamble("Update vs NF4")
run = require_run(sel)
if run is None:
    st.stop()
others = [r for r in sel.runs if r.run_id != run.run_id and (r.path / layout.SURVIVAL).is_file()]
overlay_ids = st.multiselect("overlay runs (one line per run)", [r.run_id for r in others],
                             default=[sel.compare.run_id] if sel.compare in others else [], key="survival-overlay")
runs = [run, *[r for r in others if r.run_id in overlay_ids]]
# the view in the URL (?scope=&node=&kappa=): a deep link reopens it
KAPPA_FIELD = url_state.UrlField("kappa", "floor-kappa", url_state.number(0.1, 4.0), show=lambda k: f"{k:g}")
URL_FIELDS = [url_state.UrlField("scope", "survival-scope"), url_state.UrlField("node", "nodeweights-node"),
              KAPPA_FIELD]
url_state.restore(URL_FIELDS)
surv = {f"{run_name(r)}": load_json(r, layout.SURVIVAL) for r in runs}

main = surv[next(iter(surv))]
if main is None:
    not_computed("survival of the update under NF4 (survival.json)", run)
else:
    line = sv.headline(main)
    if line:
        st.markdown(f"### {line}")
    if isinstance(main.get("headline"), str) and main["headline"] != line:
        st.caption(f"survival analysis: {main['headline']}")
    layers = sorted(sv.per_layer(main), key=sv._natural_key)
    if st.session_state.get("survival-scope") not in ["overall", *layers]:  # e.g. a deep link's unknown layer
        st.session_state.pop("survival-scope", None)
    scope = st.selectbox("scope", ["overall", *layers], key="survival-scope",
                         format_func=lambda s: s if s == "overall" else f"layer {s}")
    series = {}
    for label, data in surv.items():
        if data is None:
            continue
        entry = sv.overall(data) if scope == "overall" else sv.per_layer(data).get(scope)
        hist = sv.histogram_of(entry, sv.shared_edges(data)) if isinstance(entry, dict) else None
        if hist is not None:
            series[label] = hist
    if series:
        st.plotly_chart(sv.histogram_figure(series, title=f"|delta| / NF4 bin width ({scope})"), key="survival-hist",
                        width="stretch")
    else:
        st.info("no histogram recorded for this scope")
    tensors = sv.per_tensor(main)
    rows = sv.by_kind_and_layer(tensors) if tensors else {label: sv.per_layer(d) for label, d in surv.items() if d}
    if any(rows.values()):
        st.plotly_chart(sv.code_change_heatmap(rows), key="survival-heatmap", width="stretch")



def node_breakdown() -> None:
    """Per node: weights owned and touched, codes changed per quantizer, median |delta|/bin; then one node's panel."""
    st.subheader("weights under the circuit, per node")
    report = load_report(run)
    if isinstance(report, str):
        st.info(f"per-node breakdown: not computed for this run ({run.run_id}): {report}")
        return
    touched_only = st.toggle("only nodes whose weights unlearning touched", value=True, key="nodeweights-touched")
    table = node_table(report, touched_only=touched_only)
    pct = {c: st.column_config.NumberColumn(format="%.3g%%") for c in table.columns if c.endswith("%")}
    st.dataframe(table, hide_index=True, width="stretch", key="nodeweights-table",
                 column_config={**pct, "median |delta| / NF4 bin": st.column_config.NumberColumn(format="%.3g")})
    st.caption(f"{report.n_touched:,} coordinates touched in all; percentages are of each node's own weights (of "
               "those a quantizer takes, for codes changed); a GQA key/value row counts for every head that shares it")
    ranked = sorted(report.nodes, key=lambda n: -report.nodes[n].touched)
    if st.session_state.get("nodeweights-node") not in ranked:
        st.session_state["nodeweights-node"] = ranked[0]
    node = st.selectbox("node", ranked, key="nodeweights-node",
                        format_func=lambda n: f"{n} ({report.nodes[n].touched:,} touched)")
    node_panel(run, node, key="update-node-weights")


node_breakdown()

align = {f"{run_name(r)}": sv.alignment_summary(r.metrics) for r in runs}
align = {k: v for k, v in align.items() if v is not None}
if align:
    first = next(iter(align.values()))
    st.markdown(f"**base alignment** (`{first.get('setting', '?')}`): mean distance to the NF4 level "
                f"{first.get('mean_distance', float('nan')):.3f} bin widths; "
                f"{100 * (first.get('frac_on_grid') or 0):.1f}% of weights on the grid. A base that sits on the grid "
                "rounds every sub-half-bin update back to its old code; a natural base dithers it.")
    st.plotly_chart(sv.alignment_figure({k: v["histogram"] for k, v in align.items()}), key="alignment-hist",
                    width="stretch")
else:
    not_computed("base alignment diagnostic (metrics.json base_alignment)", run)

grid = run.metrics.get("base_grid") if isinstance(run.metrics, dict) else None
if isinstance(grid, dict) and grid.get("quantizers"):
    st.markdown("**every quantizer's grid**: does sub-bin forgetting on this base survive it? (k: the kept "
                "fraction of a sub-bin update; k < 0.5 means undone, docs/quantizers.md)")
    st.dataframe(vq.verdict_rows(grid), hide_index=True)
run_spec = run.config.get("spec") if isinstance(run.config.get("spec"), dict) else {}
max_gap = float((run_spec.get("scorecard") or {}).get("max_ptq_gap") or 0.0)
gap_fig = vq.ptq_gap_by_quantizer_figure(run.metrics, max_gap) if isinstance(run.metrics, dict) else None
if gap_fig is not None:
    st.plotly_chart(gap_fig, key="ptq-gap-by-quantizer", width="stretch")

@st.fragment
def floor_tuner() -> None:
    """The κ slider and its preview as a fragment: moving the slider reruns only this, not the page's histograms,
    heatmap and per-node table (the preview itself takes a few ms; the full page rerun was most of the latency)."""
    st.subheader("magnitude floor κ: live preview")
    st.caption("Every updated parameter must move at least κ NF4 bin widths so its 4-bit code changes. "
               "The preview recomputes, from this run's saved update, how many parameters would change code, "
               "the Fisher budget the floor would spend and how many parameters it would drop.")
    spec = run.config.get("spec") if isinstance(run.config.get("spec"), dict) else run.config
    default_kappa = float((spec.get("unlearn") or {}).get("kappa", 1.0) or 1.0)
    kappa = st.slider("κ (bin widths)", 0.1, 4.0, min(4.0, max(0.1, default_kappa)), step=0.1, key="floor-kappa")
    fields, elapsed, message = preview(run, kappa)
    if message:
        st.info(message)
    else:
        show_preview(fields, elapsed)
        if st.button(f"apply κ = {kappa:.1f} and evaluate (new run)", key="floor-apply"):
            try:
                ui_launch.launch([child_spec(run.run_id, kappa=round(kappa, 4))],
                                 label=f"{run.run_id[:15]}-kappa{kappa:g}")
            except (ValueError, FileNotFoundError) as exc:
                st.error(f"not started: {exc}")
            else:
                st.rerun()                  # the whole page, so its progress panel shows the new run
    url_state.publish([KAPPA_FIELD])        # a fragment rerun does not reach the page's own publish


floor_tuner()
url_state.publish(URL_FIELDS)
ui_launch.progress_panel()
