"""Report: one self-contained HTML file for reviewers (plotly figures embedded, scorecard table,
config and versions) plus each figure as PNG and SVG."""

import io
import zipfile

import streamlit as st

from mansu.io import stamp
from mansu.launch import exports_dir
from mansu.runs.store import library_versions
from mansu.viz.report import build_report_html, export_images, run_figures, scorecard_html, scorecard_rows
from ui.state import page_preamble, require_run

sel = page_preamble("Report")
run = require_run(sel)
if run is None:
    st.stop()
others = [r for r in sel.runs if r.run_id != run.run_id]
figs, missing = run_figures(run, others)
st.markdown(scorecard_html(scorecard_rows(run.scorecard)), unsafe_allow_html=True)
st.write(f"{len(figs)} figures: " + ", ".join(figs) if figs else "no figures yet")
for item in missing:
    st.caption(f"{item}: not computed for this run")

out = exports_dir(run.run_id)
if st.button("Build HTML report", type="primary", key="report-build"):
    versions = {**run.config.get("versions", {}), **library_versions(), "mansu": stamp()}
    html = build_report_html(f"mansu report: {run.run_id}", figs, run.scorecard, run.config, versions,
                             notes=[f"{m}: not computed for this run" for m in missing])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    st.session_state["report-path"] = str(path)
if st.session_state.get("report-path", "").startswith(str(out)):
    path = st.session_state["report-path"]
    st.success(f"report written to {path}")
    st.download_button("Download report.html", open(path, "rb").read(), file_name=f"{run.run_id}-report.html",
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
