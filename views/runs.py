"""Runs (home): the table of runs with status, scorecard badges and key numbers; select, compare,
delete; on a fresh install one action: build and run the demo."""

import pandas as pd
import streamlit as st

from mansu.attack.relearn import read_attacks
from mansu.launch import ACTIVE, cancel_run
from mansu.metrics.text import text_summary
from mansu.paths import runs_root
from mansu.runs.store import delete_run
from mansu.viz.attack import attack_curves_figure, recovered_rows
from mansu.viz.report import badge_markdown, scorecard_rows
from mansu.viz.tables import run_row
from ui import launch as ui_launch
from ui.state import COMPARE_KEY, RUN_KEY, page_preamble

sel = page_preamble("Runs")

if not sel.runs:
    st.markdown("### Welcome to mansu\nNo runs yet. One click builds the embedded demo world (a fictitious "
                "knowledge base and a small Llama trained on it on the CPU, about a minute), then runs two methods "
                "on it, one after the other: GradDiff (a gradient baseline) and MANSU. Each run evaluates in full "
                "precision and NF4, finds the circuit, unlearns, measures CAD and fills in the scorecard. Both use "
                "the NF4-grid-aligned base, where gradient unlearning was measured to come back after 4-bit "
                "quantization (the outcome depends on the alignment: pick *natural* on Launch to compare).")
    if not ui_launch.launches():
        if st.button("Build and run the demo", type="primary", key="demo-button"):
            ui_launch.launch_demo()
            st.rerun()
    ui_launch.progress_panel()
    st.stop()

rows = [run_row(r.run_id, r.config, r.status, r.metrics, r.scorecard, r.cad) for r in sel.runs]
table = pd.DataFrame(rows)
st.dataframe(table, hide_index=True, width="stretch", key="runs-table")
corrupt = [r for r in sel.runs if r.corrupt]
if corrupt:
    st.warning(f"{len(corrupt)} run folder(s) cannot be read and are listed as corrupt: "
               + "; ".join(f"`{r.run_id}`: {r.corrupt}" for r in corrupt), icon="⚠️")
st.caption("scorecard: meaningful forgetting · retain preservation · non-positive PTQ gap · structural erasure "
           "(✓ pass, ✗ fail, ? not available); accuracies are cloze MCQ after unlearning; "
           "PTQ gap = forget NF4 − forget fp.")

ids = [r.run_id for r in sel.runs]
col1, col2, col3 = st.columns(3)
with col1:
    chosen = st.selectbox("run", ids, index=ids.index(sel.run.run_id) if sel.run else 0, key="runs-pick")
    if st.button("Open", key="open-run"):
        st.session_state[RUN_KEY] = chosen
        st.rerun()
with col2:
    others = [i for i in ids if i != (sel.run.run_id if sel.run else None)]
    if others:
        other = st.selectbox("compare the selected run with", others, key="runs-compare")
        if st.button("Compare", key="compare-run"):
            st.session_state[COMPARE_KEY] = other
            st.switch_page("views/before_after.py")
with col3:
    victim = st.selectbox("delete run", ids, key="runs-delete")
    confirm = st.checkbox("yes, delete this run folder", key="runs-delete-confirm")
    if st.button("Delete", key="delete-run", disabled=not confirm):
        run = next(r for r in sel.runs if r.run_id == victim)
        if run.status.get("state") in ACTIVE:
            st.error("this run is still queued or running: cancel it first (the Cancel button below, any tab)")
        else:
            delete_run(victim, runs_root())
            st.session_state.pop(RUN_KEY, None)
            st.rerun()

if sel.run is not None:
    run = sel.run
    if run.status.get("state") in ACTIVE and st.button("Cancel this run", key="runs-cancel"):
        cancel_run(run.run_id, runs_root())  # stops its backend process (and the rest of its queue)
        st.rerun()
    st.subheader(f"Selected: {run.run_id}")
    rows = scorecard_rows(run.scorecard)
    if rows:
        st.markdown(" ".join(badge_markdown(r) for r in rows))
    else:
        st.info("scorecard: not computed for this run.")
    if run.status.get("error"):
        st.error(f"{run.status.get('state')}: {run.status['error']}")
    spec = run.config.get("spec") or {}
    eval_sets = (run.metrics or {}).get("eval_sets") or {}
    erasure = ((run.scorecard or {}).get("properties") or {}).get("structural_erasure") or {}
    st.caption(f"template `{spec.get('template', 'cloze-answer')}` · attribution corruption "
               f"`{spec.get('corruption', 'auto')}` · scored on {eval_sets.get('forget', 'the forget split')} and "
               f"{eval_sets.get('retain', 'the retain split')}")
    if eval_sets.get("warning"):
        st.warning(eval_sets["warning"], icon="⚠️")
    if text_summary(run.metrics or {}):  # QA/text memorisation metrics (mansu.metrics.text, docs/metrics.md)
        st.caption(text_summary(run.metrics or {}))
    if (run.scorecard or {}).get("nothing_to_forget"):  # mansu/scorecard.py: the base did not know the forget set
        st.warning(f"nothing to forget: {run.scorecard.get('reason')}", icon="⚠️")
    elif erasure.get("reason"):
        st.info(f"structural erasure {erasure.get('status', 'not available')}: {erasure['reason']}")
    attacks = read_attacks(run.path)
    if attacks:  # written by `mansu attack RUN --kind ...`
        st.markdown("**Relearning attacks** (`mansu attack`): does the forgetting come back under fine-tuning?")
        st.plotly_chart(attack_curves_figure(attacks), key="runs-attacks", width="stretch")
        st.dataframe(pd.DataFrame(recovered_rows(attacks)), hide_index=True)
    with st.expander("config"):
        st.json(run.config, expanded=False)

ui_launch.progress_panel()
