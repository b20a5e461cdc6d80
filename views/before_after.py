"""Before / after: the before and after graphs side by side in the same layout, the diff view, the run's next-step
advice, the QA/text memorisation metrics per stage and quantizer, CAD with its interval and per-edge contributions,
the quadrant plot across runs, the fp vs NF4 accuracy bars per run and the method x quantizer PTQ-gap matrix of
every run on the same model and data."""

import streamlit as st

from mansu.matrix import GapCell, MatrixRun, gap_matrix
from mansu.metrics.text import text_table
from mansu.viz.circuit import circuit_figure, diff_figure
from mansu.viz.compare import cad_figure
from mansu.viz.matrix import gap_matrix_figure
from mansu.viz.report import comparison_figures
from mansu.viz.reviewer import base_of, method_of
from ui.state import load_graph, not_computed, page_preamble, require_run

sel = page_preamble("Before / after")
run = require_run(sel)
if run is None:
    st.stop()

after_stage = st.radio("after", ["after_fp", "after_nf4"], horizontal=True, key="ba-stage",
                       format_func=lambda s: "after (fp)" if s == "after_fp" else "after (NF4)")
top_n = st.slider("top-n edges", 10, 1000, 200, step=10, key="ba-topn")
before, after = load_graph(run, "before"), load_graph(run, after_stage)
# one colour/size scale for both stages, so a fading node looks faded
score_max = max([float(abs(g.scores).max()) for g in (before,
                                                      after) if g is not None and g.scores.size] or [0.0]) or None
left, right = st.columns(2)
with left:
    if before is None:
        not_computed("attribution before unlearning", run)
    else:
        st.plotly_chart(circuit_figure(before, top_n=top_n, title="before", score_max=score_max), key="ba-before",
                        width="stretch")
with right:
    if after is None:
        not_computed(f"attribution {after_stage}", run)
    else:
        st.plotly_chart(circuit_figure(after, top_n=top_n, title=after_stage.replace("_", " "),
                                       score_max=score_max), key="ba-after",
                        width="stretch")
if before is not None and after is not None:
    st.plotly_chart(diff_figure(before, after, top_n=top_n), key="ba-diff", width="stretch")

advice = ((run.metrics or {}).get("advice") or {}).get("line")
if advice:  # mansu.advice: the flag to change when the run missed
    st.info(f"next step: {advice}")

text_rows = text_table(run.metrics or {})
if text_rows:  # QA/text runs: the scorecard reads ROUGE-L recall, not the token accuracy of the bars below
    st.subheader("memorisation (QA/text): ROUGE-L recall and loss, fp and every quantizer")
    st.dataframe(text_rows, hide_index=True, key="ba-text")
    st.caption("ROUGE-L recall of the greedy continuation (text: verbatim) or answer (QA: knowledge) against the true "
               "one; loss in nats per token; membership AUC of Min-K% forget vs holdout (0.5: indistinguishable). "
               "The accuracy charts below show token accuracy on these runs. Definitions: docs/metrics.md.")

st.subheader("CAD: circuit attribution divergence")
cad = run.cad  # checked by mansu.runs.store.read_cad when the run was loaded
if cad is None:
    not_computed("CAD (cad.json)", run)
else:
    st.plotly_chart(cad_figure(cad), key="ba-cad", width="stretch")

st.subheader("across runs")
runs = [r for r in sel.runs if r.metrics]
if sel.compare is not None and sel.compare not in runs:
    runs.append(sel.compare)
which = st.radio("quadrant plot in", ["nf4", "fp"], horizontal=True, key="ba-quadrant-which",
                 format_func=lambda w: "NF4 (deployed model)" if w == "nf4" else "full precision")
card_cfg = (run.scorecard or {}).get("config", {}) if isinstance(run.scorecard, dict) else {}
figs = comparison_figures(runs, which=which, drop_margin=float(card_cfg.get("forget_margin", 0.5)),
                          cad_threshold=float(card_cfg.get("cad_threshold", 0.3)))
quadrant = [k for k in figs if k.startswith("suppression")]
if quadrant:
    st.plotly_chart(figs[quadrant[0]], key="ba-quadrant", width="stretch")
else:
    st.info("quadrant plot: needs runs with both evaluation and CAD; not computed for any run yet.")
if "fp vs NF4 accuracy" in figs:
    st.plotly_chart(figs["fp vs NF4 accuracy"], key="ba-bars", width="stretch")
else:
    st.info("fp vs NF4 accuracy: no run has finished its evaluation yet.")

st.subheader("PTQ gap per method and quantizer")


@st.cache_data(show_spinner=False, max_entries=8)
def _matrix(key: tuple, _runs: list[MatrixRun]) -> list[GapCell]:
    """The bootstrap is seeded, so a key of run ids and finished stages identifies the matrix."""
    return gap_matrix(_runs)


def _same_data(other) -> bool:
    mine, theirs = run.config.get("spec") or {}, other.config.get("spec") or {}
    return all(mine.get(k) == theirs.get(k) for k in ("model", "forget", "fmt"))


pool = [r for r in sel.runs if r.metrics and _same_data(r)]
cells = _matrix(tuple((r.run_id, r.status.get("state"), r.status.get("stage")) for r in pool),
                [MatrixRun(base_of(r), method_of(r), r.metrics) for r in pool])
bases = list(dict.fromkeys(c.base for c in cells))
if not bases:
    not_computed("PTQ gap per quantizer with per-question results (metrics.json unlearned_quant)", run)
else:
    base = st.radio("base alignment", bases, horizontal=True, key="ba-matrix-base",
                    index=bases.index(base_of(run)) if base_of(run) in bases else 0)
    st.plotly_chart(gap_matrix_figure(cells, base), key="ba-matrix", width="stretch")
    st.caption(f"Every finished run on this run's model and forget data ({len(pool)} runs), grouped by method and "
               "base alignment and pooled over seeds; 95% bootstrap intervals over forget questions on hover. "
               "`mansu compare` writes the same matrix into its results table.")
