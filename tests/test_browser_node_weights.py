"""Browser tests of the node-weights panel and of view state in the URL (Chromium via Playwright, one streamlit
server for the module, as in test_browser_app.py), on a real tiny run: a deep link that pins a node opens its
panel (touched weights, codes changed per quantizer, |delta|/bin histogram, edges before/after) with the numbers
mansu.viz.node_weights measures; a changed stage goes into the URL and a reload keeps it; the per-record spread
and a diff of two stages open from links; a run link opens on every page.

With CI=true these tests never skip; elsewhere they skip only when chromium or playwright is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_browser_app as app_browser  # skips this module too where chromium or playwright is missing (not CI)
from test_browser_app import PAGES, _no_exception, _open, _serve

browser, tab = app_browser.browser, app_browser.page   # the shared fixtures: a browser, a fresh tab per test

REPO = Path(__file__).resolve().parents[1]
DOCS_SHOTS = REPO / "docs" / "screenshots"
pytestmark = pytest.mark.timeout(120)

_CHART_TITLES = "() => [...document.querySelectorAll('.js-plotly-plot')].map(p => p._fullLayout?.title?.text || '')"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A home with one real MANSU run on a tiny saved Llama, and its per-node report (the numbers to expect)."""
    from mansu.pipeline import RunSpec, run_pipeline, start_run
    from mansu.testing import write_tiny_world
    from mansu.viz.node_weights import node_weight_report

    home = tmp_path_factory.mktemp("browser-node-weights")
    world = write_tiny_world(home / "world")
    spec = RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], base_alignment="nf4-grid",
                   unlearn={"method": "mansu", "steps": 2, "batch_size": 4, "k": 2, "n_fisher": 4,
                            "update_fraction": 0.01, "epsilon": 1e6}, attribution_records=4, ig_steps=2)
    run = start_run(spec, root=home / "runs")
    run_pipeline(run)
    report = node_weight_report(run)
    node = max(report.nodes, key=lambda n: report.nodes[n].touched)
    return home, run, report.nodes[node]


@pytest.fixture(scope="module")
def server(tiny):
    home, run, _ = tiny
    with _serve(home, run.parent) as url:
        yield url


def _metric(tab, label: str) -> str:
    box = tab.locator("[data-testid='stMetric']", has_text=label).first
    box.wait_for(timeout=60_000)
    return box.locator("[data-testid='stMetricValue']").inner_text()


def test_pinned_node_shows_the_weights_it_owns(server, tab, tiny):
    _, run, node = tiny
    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    tab.set_viewport_size({"width": 1400, "height": 3000})       # the page scrolls inside streamlit: show it all
    _open(tab, f"{server}/circuit?run={run.name}&stage=after_fp&pin={node.node}")
    tab.get_by_text(f"weights under {node.node}").first.wait_for(timeout=60_000)
    assert _metric(tab, "weights owned") == f"{node.owned:,}"
    assert _metric(tab, "touched by unlearning") == f"{node.touched:,}" and node.touched > 0
    assert _metric(tab, "NF4 codes changed") == f"{node.codes_changed['nf4']:,}"
    tab.wait_for_function(f"() => ({_CHART_TITLES})().some(t => t.includes('NF4 bin width of {node.node}'))",
                          timeout=60_000)
    for text in ("codes changed per quantizer", f"edges of {node.node}: score before and after"):
        tab.get_by_text(text).first.wait_for(timeout=30_000)
    assert tab.get_by_role("radio", name="after (fp)").is_checked()            # the link's stage
    panel = tab.get_by_role("heading", name=f"weights under {node.node}").first
    top = panel.bounding_box()["y"] - 10
    tab.screenshot(path=str(DOCS_SHOTS / "circuit-node-weights.png"),
                   clip={"x": 300, "y": top, "width": 1100, "height": min(1000, 3000 - top)})
    _no_exception(tab)


def test_view_state_goes_into_the_url_and_survives_a_reload(server, tab, tiny):
    _, run, node = tiny
    _open(tab, f"{server}/circuit?run={run.name}&pin={node.node}")
    tab.get_by_text(f"weights under {node.node}").first.wait_for(timeout=60_000)
    tab.get_by_text("after (NF4)").first.click()
    tab.wait_for_function("() => location.search.includes('stage=after_nf4')", timeout=30_000)
    assert f"pin={node.node}" in tab.url and f"run={run.name}" in tab.url
    _open(tab, tab.url)                                                        # the deep link reopens the view
    tab.get_by_text(f"weights under {node.node}").first.wait_for(timeout=60_000)
    assert tab.get_by_role("radio", name="after (NF4)").is_checked()
    _open(tab, f"{server}/circuit?run={run.name}&view=spread&stage=before")
    tab.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(p => p._fullData"
                          ".some(t => t.type === 'box'))", timeout=60_000)
    tab.get_by_text("every dot one forget record").first.wait_for(timeout=30_000)
    _open(tab, f"{server}/circuit?run={run.name}&view=diff&a=after_fp&b=after_nf4&pin={node.node}")
    tab.wait_for_function(f"() => ({_CHART_TITLES})().some(t => t.includes('after (NF4) vs') && "
                          "t.includes('after (fp)'))", timeout=60_000)
    tab.wait_for_function("() => !location.search.includes('pin=')", timeout=30_000)  # the graph view's: dropped
    assert "view=diff" in tab.url and "a=after_fp" in tab.url
    _no_exception(tab)


def test_a_run_link_opens_on_every_page(server, tab, tiny):
    _, run, node = tiny
    for slug, title in PAGES.items():
        _open(tab, f"{server}/{slug}?run={run.name}")
        tab.get_by_role("heading", name=title).first.wait_for(timeout=30_000)
        assert tab.get_by_text("Page not found").count() == 0, slug
        assert f"run={run.name}" in tab.url, (slug, tab.url)   # /runs goes to / (the Runs page) with its query
        _no_exception(tab)
    _open(tab, f"{server}/update_nf4?run={run.name}&node={node.node}")
    tab.get_by_text(f"weights under {node.node}").first.wait_for(timeout=60_000)
    assert _metric(tab, "touched by unlearning") == f"{node.touched:,}"
    _no_exception(tab)
