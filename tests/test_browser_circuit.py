"""Browser tests of the Circuit page (Chromium via Playwright, one streamlit server for the module, as in
test_browser_app.py): a 543k-edge graph opens pruned and grouped, node search pins a node and draws its edges, several
pins (from the URL and a click) make a subgraph that is highlighted, kept in the URL and exported, the diff view shows
the CAD split, and the drawn subgraph downloads as CSV and circuit-tracer JSON.

With CI=true these tests never skip; elsewhere they skip only when chromium or playwright is missing.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import test_browser_app as app_browser  # skips this module too where chromium or playwright is missing (not CI)
from test_browser_app import _no_exception, _open, _serve

browser, tab = app_browser.browser, app_browser.page   # the shared fixtures: a browser, a fresh tab per test

REPO = Path(__file__).resolve().parents[1]
DOCS_SHOTS = REPO / "docs" / "screenshots"
pytestmark = pytest.mark.timeout(300)

# the drawn figure's edges: line traces of the pruned graph (NaN breaks, one per edge)
_DRAWN = """() => { const gd = document.querySelector('.js-plotly-plot');
    return gd._fullData.filter(t => t.mode === 'lines' && ['+', '-'].includes(t.legendgroup))
        .reduce((n, t) => n + t.x.filter(v => v === null || Number.isNaN(v)).length, 0); }"""
_TRACE_NAMES = "() => (document.querySelector('.js-plotly-plot')?._fullData || []).map(t => t.name || '')"


@pytest.fixture(scope="module")
def circuit_runs(tmp_path_factory):
    """A home with the two sample runs, a 4-layer x 8-head run with flips and outside growth (the diff screenshot)
    and a 32 x 32-head run (543k edges)."""
    from mansu.testing import write_large_graph_run, write_sample_run

    home = tmp_path_factory.mktemp("browser-circuit")
    runs = home / "runs"
    write_sample_run(runs, "mansu", seed=0, forget_after=0.3)
    small = write_large_graph_run(runs, 4, 8, seed=1, n_circuit=60, max_links=5000, grow_fraction=0.05)
    large = write_large_graph_run(runs, 32, 32, seed=0)
    return home, runs, {"small": small.name, "large": large.name}


@pytest.fixture(scope="module")
def server(circuit_runs):
    home, runs, _ = circuit_runs
    with _serve(home, runs) as url:
        yield url


def _wait_chart(page) -> None:
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    page.wait_for_function("() => { const gd = document.querySelector('.js-plotly-plot');"
                           " return gd && gd._fullData && gd._fullData.length > 0; }", timeout=60_000)


def _search(page, text: str) -> None:
    box = page.get_by_label("search nodes")
    box.fill(text)
    box.press("Enter")


def _metric(page, label: str) -> float:
    return float(page.locator("[data-testid='stMetric']", has_text=label)
                 .locator("[data-testid='stMetricValue']").inner_text())


def test_large_graph_opens_pruned_and_grouped(server, tab, circuit_runs):
    _open(tab, f"{server}/circuit?run={circuit_runs[2]['large']}")
    _wait_chart(tab)
    summary = tab.get_by_text("edges drawn, carrying").first
    summary.wait_for(timeout=60_000)
    text = summary.inner_text()
    from mansu.viz.artifacts import load_graph
    from mansu.viz.graph_ops import group_by_layer

    n_grouped = group_by_layer(load_graph(circuit_runs[1] / circuit_runs[2]["large"], "before")).n_edges
    assert f"300 of {n_grouped:,} edges drawn" in text and "1,058 nodes grouped into 66" in text, text
    assert tab.evaluate(_DRAWN) == 300                  # the default top-k, out of 543,281 edges grouped to 2,145
    assert tab.evaluate("() => document.querySelector('.js-plotly-plot')._fullData.at(-1).x.length") == 66
    tab.get_by_text("group heads per layer").click()    # ungrouped: the top-k of all 543,281 edges
    tab.get_by_text("of 543,281 edges drawn").first.wait_for(timeout=60_000)
    tab.wait_for_function("() => document.querySelector('.js-plotly-plot')?._fullData?.at(-1)?.x.length === 1058",
                          timeout=60_000)
    assert tab.evaluate(_DRAWN) == 300
    tab.screenshot(path=str(REPO / "tests" / "_screenshots" / "circuit-large.png"), full_page=True)
    _no_exception(tab)


def test_node_search_pins_a_node_and_draws_its_edges(server, tab, circuit_runs):
    _open(tab, f"{server}/circuit?run={circuit_runs[2]['large']}")
    _wait_chart(tab)
    _search(tab, "a5.h3")
    tab.get_by_text("edges of a5.h3 (layer 5 head 3)").wait_for(timeout=60_000)
    tab.wait_for_function(f"() => ({_TRACE_NAMES})().some(n => n.startsWith('edges of a5.h3'))", timeout=60_000)
    names = tab.evaluate(_TRACE_NAMES)
    assert any(n.startswith("search matches") for n in names), names
    matches = tab.get_by_text("search 'a5.h3': 3 node(s): a5.h3, a5.h30, a5.h31")
    matches.first.wait_for(timeout=60_000)
    assert matches.count() == 1
    tab.wait_for_function("() => document.querySelectorAll('[data-testid=\"stDataFrame\"]').length >= 2",
                          timeout=60_000)                                     # its incoming and outgoing edges
    _no_exception(tab)


_NODE_XY = """name => { const gd = document.querySelector('.js-plotly-plot'); const fl = gd._fullLayout;
    const tr = gd._fullData[gd._fullData.length - 1]; const i = tr.customdata.indexOf(name);
    const r = gd.getBoundingClientRect();
    return [r.left + fl._size.l + fl.xaxis.l2p(tr.x[i]), r.top + fl._size.t + fl.yaxis.l2p(tr.y[i])]; }"""


def _trace_starting(page, prefix: str) -> None:
    page.wait_for_function(f"p => ({_TRACE_NAMES})().some(n => n.startsWith(p))", arg=prefix, timeout=60_000)


def test_several_pins_make_a_highlighted_subgraph_kept_in_the_url(server, tab, circuit_runs):
    from mansu.viz.artifacts import load_graph
    from mansu.viz.graph_ops import pin_subgraph

    name = circuit_runs[2]["small"]
    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    tab.set_viewport_size({"width": 1400, "height": 1400})      # the controls, the chart and the pins' tabs
    _open(tab, f"{server}/circuit?run={name}&pin=a1.h3,a2.h5")
    _wait_chart(tab)
    for prefix in ("edges of a1.h3", "edges of a2.h5", "edges among the pins"):
        _trace_starting(tab, prefix)
    opacities = tab.evaluate("() => document.querySelector('.js-plotly-plot')._fullData"
                             ".filter(t => ['+', '-'].includes(t.legendgroup)).map(t => t.opacity)")
    assert opacities and max(opacities) < 0.35, opacities                 # the rest of the graph dimmed
    tab.screenshot(path=str(DOCS_SHOTS / "circuit-pins.png"))
    tabs = tab.get_by_role("tab")
    assert tabs.count() == 2 and tabs.first.inner_text().startswith("a2.h5")   # one panel per pin, latest first
    x, y = tab.evaluate(_NODE_XY, "a3.h6")
    tab.mouse.click(x, y)                                                    # a click adds the node to the pins
    _trace_starting(tab, "edges of a3.h6")
    tab.wait_for_function("() => decodeURIComponent(location.search).includes('pin=a1.h3,a2.h5,a3.h6')",
                          timeout=30_000)
    assert tab.get_by_role("tab").count() == 3
    tab.wait_for_function("() => document.querySelector('[role=tab][aria-selected=true]')?.innerText"
                          ".startsWith('a3.h6')", timeout=30_000)               # the new pin's tab is open
    pins = ["a1.h3", "a2.h5", "a3.h6"]
    graph = load_graph(circuit_runs[1] / name, "before")
    expected = pin_subgraph(graph, pins)
    tab.get_by_text(f"subgraph of the pins: {expected.shape[0]:,} edges").wait_for(timeout=30_000)
    with tab.expect_download(timeout=60_000) as info:
        tab.get_by_role("button", name="subgraph: CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    assert len(rows) == expected.shape[0] and all(r["source"] in pins or r["target"] in pins for r in rows)
    assert sum(r["source"] in pins and r["target"] in pins for r in rows) >= 1      # edges among the pins
    _open(tab, tab.url)                                                      # the deep link reopens all three
    _wait_chart(tab)
    for pin in pins:
        _trace_starting(tab, f"edges of {pin}")
    _no_exception(tab)


def test_diff_view_shows_the_cad_split_on_one_layout(server, tab, circuit_runs):
    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    tab.set_viewport_size({"width": 1400, "height": 1900})      # the page scrolls inside streamlit: show it all
    _open(tab, f"{server}/circuit?run={circuit_runs[2]['small']}")
    _wait_chart(tab)  # the first script run has selected the linked run: a click before it may rerun on another
    tab.get_by_text("diff of two graphs").click()
    tab.locator("[data-testid='stMetric']", has_text="CAD (A → B)").first.wait_for(timeout=60_000)
    _wait_chart(tab)
    cad, shrink, reverse, reroute = (_metric(tab, label) for label in ("CAD (A → B)", "shrinkage part",
                                                                         "reversal part", "rerouting part"))
    assert 0 < shrink < cad and reroute > 0 and reverse >= 0
    assert shrink + reverse + reroute == pytest.approx(cad, abs=3e-3)
    # the one-graph chart is replaced by the diff chart: signed change, green up and purple down
    tab.wait_for_function("() => ['Δ+', 'Δ-'].every(g => (document.querySelector('.js-plotly-plot')?._fullData || [])"
                          ".some(t => t.legendgroup === g))", timeout=60_000)
    tab.screenshot(path=str(DOCS_SHOTS / "circuit-diff-change.png"), full_page=True)
    tab.get_by_text("CAD split").first.click()
    tab.wait_for_function("() => ['shrinkage', 'rerouting', 'grew outside circuit'].every(g => (document"
                          ".querySelector('.js-plotly-plot')?._fullData || []).some(t => t.legendgroup === g))",
                          timeout=60_000)
    groups = set(tab.evaluate("() => document.querySelector('.js-plotly-plot')._fullData.map(t => t.legendgroup)"))
    assert {"shrinkage", "rerouting", "grew outside circuit"} <= groups, tab.evaluate(_TRACE_NAMES)
    tab.get_by_text("CAD split per node").wait_for(timeout=30_000)
    tab.screenshot(path=str(DOCS_SHOTS / "circuit-diff.png"), full_page=True)
    tab.get_by_text("relative change").click()
    tab.wait_for_function("() => document.querySelector('.js-plotly-plot')?._fullLayout?.title?.text"
                          ".includes('relative change')", timeout=60_000)
    _no_exception(tab)


def test_subgraph_downloads_as_csv_and_circuit_tracer_json(server, tab, circuit_runs):
    _open(tab, f"{server}/circuit?run={circuit_runs[2]['large']}")
    _wait_chart(tab)
    with tab.expect_download(timeout=60_000) as info:
        tab.get_by_role("button", name="subgraph: CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    assert len(rows) == 300 and rows[0]["source_label"] and rows[0]["target_label"]
    assert abs(float(rows[0]["score"])) >= abs(float(rows[-1]["score"]))
    assert any(r["in_circuit"] == "True" for r in rows)             # the strongest edges are the circuit's
    with tab.expect_download(timeout=60_000) as info:
        tab.get_by_role("button", name="subgraph: circuit-tracer JSON").click()
    data = json.loads(Path(info.value.path()).read_text())
    assert len(data["links"]) == 300 and {"metadata", "qParams", "nodes", "links"} <= set(data)
    assert all(" (" in node["clerp"] for node in data["nodes"])     # node name and its label
    _no_exception(tab)
