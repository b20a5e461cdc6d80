"""The reviewer report: one self-contained HTML file (plotly.js inlined once, every figure
embedded, the scorecard table, config and versions) and each figure as PNG and SVG via kaleido.

kaleido 1.x drives a Chrome/Chromium; we point it at Debian's /usr/bin/chromium through
BROWSER_PATH when that is unset, and report a readable message when no browser can be started.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from mansu.io import portable_paths
from mansu.runs import layout
from mansu.runs.store import RunSummary
from mansu.scorecard import PROPERTIES, Scorecard
from mansu.spec import run_label
from mansu.viz import survival as sv
from mansu.viz.artifacts import load_graph, read_json_or_none
from mansu.viz.circuit import circuit_figure, diff_figure
from mansu.viz.compare import cad_figure, cad_value, forgotten_fraction, fp_nf4_bars, quadrant_figure

log = logging.getLogger(__name__)
PROPERTY_ORDER = PROPERTIES
PROPERTY_TITLES = {"forgetting": "meaningful forgetting", "retain": "retain preservation",
                   "ptq_gap": "non-positive PTQ gap", "structural_erasure": "structural erasure"}


@dataclass(frozen=True)
class ScoreRow:
    name: str
    passed: bool | None
    value: float | None
    threshold: float | None
    margin: float | None
    status: str = ""          # scorecard status: pass, fail, not available, nothing to forget


def scorecard_rows(scorecard: Scorecard | None) -> list[ScoreRow]:
    """The scorecard's properties in PROPERTIES order (a scorecard from `mansu.scorecard.read_scorecard`; None or
    {} when not computed gives no rows); passed is None for a property that is neither passed nor failed (not
    available, or nothing to forget)."""
    props = (scorecard or {}).get("properties", {})
    rows = []
    for name in PROPERTIES:
        if name in props:
            p = props[name]
            passed = p["pass"] if p["status"] in ("pass", "fail") else None
            rows.append(ScoreRow(name, passed, p.get("value"), p.get("threshold"), p.get("margin"), p["status"]))
    return rows


def mark(row: ScoreRow) -> str:
    """✓ pass, ✗ fail, ∅ nothing to forget, ? not available (plain symbols: they render without an emoji font)."""
    if row.passed is None:
        return "∅" if row.status == "nothing to forget" else "?"
    return "✓" if row.passed else "✗"


def badge(row: ScoreRow) -> str:
    """A short text badge: mark and property name."""
    return f"{mark(row)} {title(row.name)}"


def badge_markdown(row: ScoreRow) -> str:
    """A Streamlit markdown badge, green/red/grey, with the margin when known."""
    color = "gray" if row.passed is None else ("green" if row.passed else "red")
    margin = "" if row.margin is None else f" (margin {row.margin:+.3f})"
    return f":{color}-badge[{badge(row)}{margin}]"


def title(name: str) -> str:
    return PROPERTY_TITLES.get(name, name.replace("_", " "))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"  # 3 significant digits: 0.333, never 0.3333


def _result_word(row: ScoreRow) -> str:
    return (row.status or "not available") if row.passed is None else ("pass" if row.passed else "fail")


def scorecard_html(rows: list[ScoreRow]) -> str:
    if not rows:
        return "<p><em>scorecard not computed for this run</em></p>"
    body = "".join(
        f"<tr><td>{html.escape(title(r.name))}</td>"
        f"<td class='{'pass' if r.passed else 'fail'}'>{_result_word(r)}</td>"
        f"<td>{_fmt(r.value)}</td><td>{_fmt(r.threshold)}</td><td>{_fmt(r.margin)}</td></tr>" for r in rows)
    return ("<table><thead><tr><th>property</th><th>result</th><th>value</th><th>threshold</th><th>margin</th>"
            f"</tr></thead><tbody>{body}</tbody></table>")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
.pass{background:#d4f7d4}.fail{background:#fbd5d5}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"""


def build_report_html(title: str, figures: dict[str, go.Figure], scorecard: Scorecard | None,
                      config: dict[str, Any], versions: dict[str, Any], notes: list[str] | None = None) -> str:
    """One self-contained HTML document: plotly.js inlined with the first figure, the others reuse it."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in portable_paths(notes or [])]
    parts.append("<h2>Scorecard</h2>" + scorecard_html(scorecard_rows(scorecard)))
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig{i}"))
    for heading, data in (("Config", config), ("Versions", versions)):  # shared with reviewers: no machine paths
        text = json.dumps(portable_paths(data), indent=2, sort_keys=True, default=str)
        parts.append(f"<h2>{heading}</h2><pre>" + html.escape(text) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


@dataclass
class ImageExport:
    written: list[Path] = field(default_factory=list)
    error: str | None = None


def find_browser() -> str | None:
    """A Chrome/Chromium for kaleido: BROWSER_PATH, then /usr/bin/chromium, then PATH."""
    for candidate in (os.environ.get("BROWSER_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("google-chrome"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")[:60] or "figure"


def export_images(figures: dict[str, go.Figure], out_dir: Path,
                  formats: tuple[str, ...] = ("png", "svg")) -> ImageExport:
    """Write each figure as PNG and SVG under out_dir; on failure return the files written and a message."""
    for fmt in formats:
        if fmt not in ("png", "svg", "pdf"):
            raise ValueError(f"unknown image format {fmt!r}: accepted are png, svg, pdf")
    browser = find_browser()
    if browser is None:
        return ImageExport(error="no Chrome/Chromium found for image export (install chromium or set BROWSER_PATH); "
                                 "the HTML report still works")
    os.environ.setdefault("BROWSER_PATH", browser)
    import kaleido

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ImageExport()
    try:
        kaleido.start_sync_server(silence_warnings=True)
        try:
            for name, fig in figures.items():
                for fmt in formats:
                    opts = {"format": fmt, "width": 1100, "height": fig.layout.height or 500}
                    data = kaleido.calc_fig_sync(fig, opts=opts)
                    path = out_dir / f"{safe_name(name)}.{fmt}"
                    path.write_bytes(data)
                    result.written.append(path)
        finally:
            kaleido.stop_sync_server(silence_warnings=True)
    except Exception as exc:  # kaleido raises many types when the browser cannot start
        log.warning("image export failed: %s", exc)
        result.error = f"image export failed ({type(exc).__name__}: {exc}); the HTML report still works"
    return result


def unique_labels(runs: list[RunSummary]) -> list[str]:
    """mansu.spec.run_label of each run (method, base, seed, short id); a label two runs share gets the run id, so
    no run is dropped from a figure or a table."""
    labels = [run_label(r.run_id, r.config) for r in runs]
    return [f"{lab} ({r.run_id})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def _labelled(runs: list[RunSummary]) -> dict[str, RunSummary]:
    """Runs with evaluation metrics by their unique label; a run passed twice is shown once."""
    runs = list({r.run_id: r for r in runs if r.metrics}.values())
    return dict(zip(unique_labels(runs), runs))


def comparison_figures(runs: list[RunSummary], *, which: str = "nf4", drop_margin: float = 0.5,
                       cad_threshold: float = 0.3) -> dict[str, go.Figure]:
    """Across runs: fp vs NF4 accuracy bars, and the forgotten fraction (the scorecard's forgetting; drop_margin is
    its forget_margin) vs CAD (suppression vs erasure) in `which`."""
    labelled = _labelled(runs)
    figs: dict[str, go.Figure] = {}
    if not labelled:
        return figs
    figs["fp vs NF4 accuracy"] = fp_nf4_bars({k: r.metrics for k, r in labelled.items()})
    points = {}
    for label, r in labelled.items():
        drop, c = forgotten_fraction(r.metrics, which), cad_value(r.cad, which)
        if drop is not None and c is not None:
            points[label] = (drop, c[0])
    if points:
        name = "NF4" if which == "nf4" else "fp"
        figs[f"suppression vs erasure ({name})"] = quadrant_figure(points, drop_margin=drop_margin,
                                                                   cad_threshold=cad_threshold, which=which)
    return figs


def _other_histograms(others: list[RunSummary], taken: str) -> dict[str, sv.Histogram]:
    """The comparison runs' |delta| / bin-width histograms (those with survival.json), by a label unlike `taken`."""
    out = {}
    for other in others:
        surv = read_json_or_none(Path(other.path) / layout.SURVIVAL)
        hist = sv.histogram_of(sv.overall(surv), sv.shared_edges(surv)) if isinstance(surv, dict) else None
        label = run_label(other.run_id, other.config)
        if hist is not None:
            out[label if label != taken and label not in out else f"{label} ({other.run_id})"] = hist
    return out


def run_figures(run: RunSummary, others: list[RunSummary]) -> tuple[dict[str, go.Figure], list[str]]:
    """(figures by title, what is missing) for a run's report, read from its folder, with its comparison runs in
    the cross-run figures and overlaid on the update histogram; the same builders the pages use."""
    figs: dict[str, go.Figure] = {}
    missing: list[str] = []
    graphs = {stage: load_graph(Path(run.path), stage) for stage in ("before", "after_fp", "after_nf4")}
    for stage, graph in graphs.items():
        if graph is None:
            missing.append(f"attribution {stage}")
            continue
        figs[f"circuit {stage}"] = circuit_figure(graph, top_n=200, title=f"circuit {stage}")
        if stage != "before" and graphs["before"] is not None:
            figs[f"diff before vs {stage}"] = diff_figure(graphs["before"], graph, top_n=200)
    surv = read_json_or_none(Path(run.path) / layout.SURVIVAL)
    hist = sv.histogram_of(sv.overall(surv), sv.shared_edges(surv)) if isinstance(surv, dict) else None
    name = run_label(run.run_id, run.config)
    if hist is None:
        missing.append("survival under NF4")
    else:
        figs["update vs NF4 bin width"] = sv.histogram_figure({name: hist, **_other_histograms(others, name)})
        rows = sv.by_kind_and_layer(sv.per_tensor(surv)) or {name: sv.per_layer(surv)}
        if any(rows.values()):
            figs["NF4 codes changed"] = sv.code_change_heatmap(rows)
    if run.cad is None:
        missing.append("CAD")
    else:
        figs["CAD"] = cad_figure(run.cad)
    comparison = comparison_figures([run, *others])
    if not comparison:
        missing.append("evaluation metrics")
    return {**figs, **comparison}, missing
