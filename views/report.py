"""Report: the reviewer report (mansu/viz/reviewer.py) of the selected run, compared with the sidebar's "compare
with" run only: one self-contained HTML file (claim and verdict, setup, results with intervals, captioned figures,
limitations, reproduce commands; prints to A4 PDF), the same document as `mansu report RUN [RUN] --out FILE`.
Each figure can also be exported as PNG and SVG."""

import datetime as dt
import io
import zipfile

import streamlit as st

from mansu.launch import exports_dir
from mansu.viz.report import export_images, run_figures, scorecard_html, scorecard_rows
from mansu.viz.reviewer import SECTIONS, labels_of, reviewer_report, verdict
from ui.state import page_preamble, require_run

sel = page_preamble("Report")
run = require_run(sel)
if run is None:
    st.stop()
runs = [run, *([sel.compare] if sel.compare is not None else [])]
labels = labels_of(runs)
st.markdown(f"**{labels[0]}**" + (f", compared with **{labels[1]}**" if len(runs) > 1 else
                                   " (pick a run under *compare with* in the sidebar to compare)"))
if run.metrics:
    st.info(verdict(runs, labels))
st.markdown(scorecard_html(scorecard_rows(run.scorecard)), unsafe_allow_html=True)
figs, missing = run_figures(run, runs[1:])
for item in missing:
    st.caption(f"{item}: not computed for this run")
st.caption("The report's sections: " + ", ".join(SECTIONS) + ". Open it in a browser and print it to save a PDF.")

out = exports_dir(run.run_id)
if st.button("Build HTML report", type="primary", key="report-build"):
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    html = reviewer_report(runs, generated=generated)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    st.session_state["report-path"] = str(path)
    st.session_state["report-runs"] = [r.run_id for r in runs]
if (st.session_state.get("report-path", "").startswith(str(out))
        and st.session_state.get("report-runs") == [r.run_id for r in runs]):
    path = st.session_state["report-path"]
    st.success(f"report written to {path}")
    name = "-vs-".join(r.run_id for r in runs)
    st.download_button("Download report.html", open(path, "rb").read(), file_name=f"{name}-report.html",
                       mime="text/html", key="report-download")

if st.button("Export figures as PNG and SVG", key="report-images", disabled=not figs):
    with st.spinner("rendering figures with kaleido (Chromium)…"):
        result = export_images(figs, out / "figures")
    if result.error:
        st.warning(result.error)
    if result.written:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in result.written:
                zf.write(p, p.name)
        st.session_state[f"report-zip-{run.run_id}"] = buf.getvalue()
        st.success(f"{len(result.written)} images written to {out / 'figures'}")
if st.session_state.get(f"report-zip-{run.run_id}"):
    st.download_button("Download figures (zip of PNG and SVG)", st.session_state[f"report-zip-{run.run_id}"],
                       file_name=f"{run.run_id}-figures.zip", mime="application/zip", key="report-zip-dl")
