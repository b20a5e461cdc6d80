"""Browser tests: Playwright drives Debian's Chromium against `streamlit run app.py` on a free
localhost port (one server for the module). Every page opens, plotly charts render, the empty
install offers the demo action, screenshots land in tests/_screenshots/.

With CI=true these tests never skip; elsewhere they skip only when chromium or playwright is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "tests" / "_screenshots"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {"runs": "Runs", "circuit": "Circuit", "update_nf4": "Update vs NF4", "before_after": "Before / after",
         "launch": "Launch a run", "report": "Report", "science": "Science"}

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev requirements pin playwright
    sync_playwright = None

_missing = sync_playwright is None or not Path(CHROMIUM).is_file()
_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
if _missing and not _ci:
    pytest.skip("chromium or playwright missing (CI is not set)", allow_module_level=True)

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("streamlit did not become healthy")


@contextlib.contextmanager
def _serve(home: Path, runs: Path):
    """`streamlit run app.py` on a free localhost port with this MANSU_HOME / MANSU_RUNS; yields its URL."""
    port = _free_port()
    env = {**os.environ, "MANSU_HOME": str(home), "MANSU_RUNS": str(runs)}
    log = open(home / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(app_runs_home):
    with _serve(*app_runs_home) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = ctx.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    ctx.close()
    assert not errors, f"javascript errors: {errors}"


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("[data-testid='stApp']", timeout=30_000)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                           " || !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                           ".innerText.includes('Running')", timeout=30_000)


def _no_exception(page) -> None:
    errors = page.locator("[data-testid='stException']")
    assert errors.count() == 0, errors.first.inner_text()


@pytest.fixture(scope="module")
def app_runs_home(tmp_path_factory, demo_assets):
    """A fresh MANSU_HOME whose demo/ links to the shared, already built demo (so a launched demo run starts at
    once), with an empty runs folder; runs are added by `with_runs` after the empty-state test."""
    return _fresh_home(tmp_path_factory.mktemp("browser"), demo_assets)


def _fresh_home(home: Path, demo_assets) -> tuple[Path, Path]:
    (home / "demo").symlink_to(demo_assets.root, target_is_directory=True)
    runs = home / "runs"
    runs.mkdir()
    return home, runs


@pytest.fixture(scope="module")
def with_runs(app_runs_home):
    from mansu.testing import write_sample_run

    _, runs = app_runs_home
    recall = {"nf4": 0.0, "fp4": 0.05, "int8": 0.0, "int4-g128": 0.1}  # per-question results: the PTQ-gap matrix
    write_sample_run(runs, "mansu", seed=0, forget_after=0.3, quant_recall=recall)
    write_sample_run(runs, "ga", seed=1, forget_after=0.6, quant_recall={q: 0.4 for q in recall})
    return runs


def test_empty_install_runs_the_demo_with_progress(server, page, app_runs_home):
    _open(page, server)
    button = page.get_by_role("button", name="Build and run the demo")
    button.wait_for(timeout=20_000)
    page.screenshot(path=str(SHOTS / "00-empty-install.png"), full_page=True)
    button.click()
    # the backend creates its run folder and reports its stage in status.json; the panel shows it live
    bar = page.locator("[data-testid='stProgress']", has_text="stage").first
    bar.wait_for(timeout=90_000)
    assert "running · stage" in bar.inner_text()
    # once the run folder exists the whole page refreshes: the runs table and the sidebar list the new run
    page.locator("[data-testid='stDataFrame']").wait_for(timeout=30_000)
    page.locator("[data-testid='stProgress']", has_text="stage").first.wait_for(timeout=30_000)
    # the whole demo comparison is one backend queue: the MANSU run is listed, queued, from the start
    page.locator("[data-testid='stProgress']", has_text="queued").first.wait_for(timeout=30_000)
    page.screenshot(path=str(SHOTS / "01-demo-progress.png"), full_page=True)
    page.get_by_role("button", name="Cancel").first.click()  # cancels the queue: the running run and the next
    try:
        page.locator("[data-testid='stAlert']", has_text="cancelled").first.wait_for(timeout=30_000)
    finally:
        page.screenshot(path=str(SHOTS / "02-demo-cancelled.png"), full_page=True)
    _no_exception(page)
    from mansu.runs.store import list_runs

    runs = list_runs(app_runs_home[1])
    assert len(runs) == 2 and {r.status["state"] for r in runs} == {"cancelled"}


@pytest.mark.parametrize("slug", list(PAGES))
def test_every_page_renders(server, page, with_runs, slug):
    _open(page, f"{server}/{slug}" if slug != "runs" else server)  # the home page lives at /
    page.get_by_role("heading", name=PAGES[slug]).first.wait_for(timeout=20_000)
    expected_charts = {"circuit": 1, "update_nf4": 2, "before_after": 6}.get(slug, 0)
    if expected_charts:
        page.wait_for_function("n => [...document.querySelectorAll('.js-plotly-plot')]"
                               ".filter(p => p.querySelector('.main-svg')).length >= n", arg=expected_charts,
                               timeout=30_000)
    assert page.locator(".js-plotly-plot").count() >= expected_charts
    if slug == "before_after":  # the method x quantizer heatmap drew its cells
        matrix = page.locator(".js-plotly-plot", has_text="forget PTQ gap").first
        matrix.locator(".heatmaplayer image, .heatmaplayer .hm").first.wait_for(state="attached", timeout=20_000)
        assert "int4-g128" in matrix.inner_text() and "ga" in matrix.inner_text()
    logo = page.locator("[data-testid='stSidebarLogo'], [data-testid='stLogo']").first
    logo.wait_for(timeout=10_000)
    assert page.evaluate("img => img.naturalWidth", logo.element_handle()) > 0  # assets/logo.svg was served
    page.screenshot(path=str(SHOTS / f"page-{slug}.png"), full_page=True)
    _no_exception(page)


def _metric(page, label: str) -> str:
    box = page.locator("[data-testid='stMetric']", has_text=label).first
    return box.locator("[data-testid='stMetricValue']").inner_text()


def _centre(locator) -> tuple[float, float]:
    box = locator.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def test_floor_slider_updates_the_preview(server, page, with_runs):
    _open(page, f"{server}/update_nf4")
    page.get_by_text("magnitude floor κ: live preview").wait_for(timeout=20_000)
    page.locator("[data-testid='stMetric']", has_text="n updated").first.wait_for(timeout=20_000)
    before = {label: _metric(page, label) for label in ("kappa", "n updated", "n dropped")}
    slider = page.locator("[data-testid='stSlider']", has_text="κ (bin widths)").locator("input[type='range']")
    slider.scroll_into_view_if_needed()
    page.mouse.click(*_centre(slider.locator("xpath=../..")))  # focus the slider's thumb
    slider.focus()
    slider.press("ArrowRight")
    # Streamlit replaces the metrics one by one: wait until both κ and the count show the new script run
    page.wait_for_function("""([n]) => {
        const ms = [...document.querySelectorAll('[data-testid="stMetric"]')];
        const kappa = ms.find(m => m.innerText.startsWith('kappa'));
        const count = ms.find(m => m.innerText.startsWith('n updated'));
        return kappa && kappa.innerText.includes('1.1') && count && !count.innerText.includes(n);
    }""", arg=[before["n updated"]], timeout=20_000)
    after = {label: _metric(page, label) for label in before}
    assert after["kappa"] != before["kappa"]
    # bigger moves, same budget
    assert int(after["n updated"].replace(",", "")) < int(before["n updated"].replace(",", ""))
    latency = page.get_by_text("preview computed in").first.inner_text()
    assert int(latency.split("in ")[1].split(" ms")[0]) <= 200
    page.screenshot(path=str(SHOTS / "floor-preview.png"), full_page=True)
    _no_exception(page)


def _download_report(page, url: str, *, reopen: bool = True) -> str:
    """Open Report (unless it is open with the wanted selection), build the HTML report and download it; returns
    its text."""
    if reopen:
        _open(page, f"{url}/report")
    page.get_by_role("button", name="Build HTML report").click()
    link = page.get_by_role("button", name="Download report.html")
    link.wait_for(timeout=120_000)
    with page.expect_download(timeout=60_000) as info:
        link.click()
    return Path(info.value.path()).read_text(encoding="utf-8")


def test_report_downloads_a_self_contained_html(server, page, with_runs):
    html = _download_report(page, server)
    assert html.count("Plotly.newPlot") >= 5 and "<script src=" not in html
    assert "meaningful forgetting" in html
    page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    _no_exception(page)


REPORT_SECTIONS = ("Claim and verdict", "Setup", "Results", "Figures", "Limitations", "Reproduce")


def test_reviewer_report_of_a_run_and_its_comparison(server, page, with_runs):
    """Issue 15: the Report page builds the reviewer report of the selected run and the sidebar's "compare with"
    run (no other run of the folder); the downloaded file renders every section and figure in Chromium, and its
    print stylesheet lays it out for A4 (toolbar hidden, a page per section)."""
    ids = {p.name.rsplit("-", 1)[1]: p.name for p in with_runs.iterdir() if "sample-" in p.name}
    _open(page, f"{server}/report?run={ids['mansu']}")
    box = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']", has_text="compare with")
    box.click()
    page.get_by_role("option", name=re.compile(r"^ga · ")).click()
    page.get_by_text("compared with").first.wait_for(timeout=30_000)
    html = _download_report(page, server, reopen=False)
    others = [p.name for p in with_runs.iterdir() if p.is_dir() and p.name not in ids.values()]
    assert ids["mansu"] in html and ids["ga"] in html and not any(o in html for o in others)
    path = SHOTS / "reviewer-report.html"
    path.write_text(html, encoding="utf-8")
    page.goto(path.as_uri())
    for heading in REPORT_SECTIONS:
        assert page.get_by_role("heading", name=heading, exact=True).is_visible(), heading
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                           ".filter(p => p.querySelector('.main-svg')).length >= 5", timeout=60_000)
    assert page.locator("figure figcaption").count() == page.locator("figure .js-plotly-plot").count() >= 5
    verdict = page.locator("#claim").inner_text()
    assert "lowered forget accuracy from 1 to 0.3 in full precision" in verdict and "Verdict:" in verdict
    results = page.locator("#results table").first.inner_text()
    assert "0.3 [0.25, 0.35]" in results and "+0.02 [-0.01, +0.05]" in results
    page.set_viewport_size({"width": 1200, "height": 1500})
    page.screenshot(path=str(SHOTS / "reviewer-report.png"))  # docs/report-screenshot.png is of real demo runs
    page.emulate_media(media="print")
    assert not page.get_by_role("button", name="Print / save as PDF").is_visible()
    assert page.get_by_role("heading", name="Limitations", exact=True).is_visible()
    assert page.evaluate("() => getComputedStyle(document.querySelector('#setup')).breakBefore") == "page"
    pdf = page.pdf(format="A4", print_background=True)
    assert pdf[:5] == b"%PDF-" and len(re.findall(rb"/Type\s*/Page[^s]", pdf)) >= len(REPORT_SECTIONS)


def test_click_a_node_pins_it_and_lists_its_edges(server, page, with_runs):
    _open(page, f"{server}/circuit")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    # pixel position of node m0 from plotly's own axes (nodes are the last trace)
    x, y = page.evaluate("""() => { const gd = document.querySelector('.js-plotly-plot'); const fl = gd._fullLayout;
        const tr = gd._fullData[gd._fullData.length - 1]; const i = tr.customdata.indexOf('m0');
        const r = gd.getBoundingClientRect();
        return [r.left + fl._size.l + fl.xaxis.l2p(tr.x[i]), r.top + fl._size.t + fl.yaxis.l2p(tr.y[i])]; }""")
    page.mouse.click(x, y)
    page.get_by_text("edges of m0 (layer 0 MLP)").wait_for(timeout=30_000)  # the heading, not the legend
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stDataFrame\"]').length == 2",
                           timeout=30_000)  # incoming and outgoing edges of the pinned node
    page.screenshot(path=str(SHOTS / "circuit-pinned.png"), full_page=True)
    _no_exception(page)


def _launch_own(page, server, home, model: str) -> None:
    _open(page, f"{server}/launch")
    page.get_by_text("use the embedded demo world and model").click()  # untick: use own model and data
    page.get_by_label("model path or hub id (ignored for the demo)").fill(model)
    page.get_by_label("forget file path").fill(str(home / "demo" / "forget.jsonl"))
    page.get_by_label("retain file path").fill(str(home / "demo" / "retain.jsonl"))
    page.get_by_role("button", name="Start run").click()


def test_launch_refuses_a_missing_model_and_shows_a_backend_error_readably(server, page, app_runs_home):
    import shutil

    home, runs = app_runs_home
    before = sorted(p.name for p in runs.iterdir())
    # checked before anything starts: no process, no run folder
    _launch_own(page, server, home, str(home / "no-such-model"))
    refused = page.locator("[data-testid='stAlert']", has_text="not started:").first
    refused.wait_for(timeout=30_000)
    assert "no-such-model" in refused.inner_text() and sorted(p.name for p in runs.iterdir()) == before
    # a model folder whose config and tokenizer pass the checks but whose weights are missing fails in the backend
    broken = home / "no-weights"
    shutil.copytree(home / "demo" / "model", broken, ignore=shutil.ignore_patterns("*.safetensors"))
    _launch_own(page, server, home, str(broken))
    page.get_by_text("started:").first.wait_for(timeout=30_000)
    alert = page.locator("[data-testid='stAlert']", has_text="backend error").first
    alert.wait_for(timeout=180_000)
    assert "no-weights" in alert.inner_text() and "Traceback" not in alert.inner_text()
    page.screenshot(path=str(SHOTS / "launch-backend-error.png"), full_page=True)
    _no_exception(page)


def test_circuit_exports_json_png_and_svg(server, page, with_runs):
    # a link to the sample MANSU run: earlier tests in this module add runs without a graph
    (run_id,) = [p.name for p in with_runs.iterdir() if p.name.endswith("sample-mansu")]
    _open(page, f"{server}/circuit?run={run_id}")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    with page.expect_download(timeout=30_000) as info:
        page.get_by_role("button", name="graph JSON").click()
    graph = json.loads(Path(info.value.path()).read_text())
    assert graph["nodes"] and graph["links"]
    page.get_by_role("button", name="prepare PNG and SVG").click()
    saved = {}
    for ext in ("png", "svg"):
        button = page.get_by_role("button", name=re.compile(rf"download circuit-.*\.{ext}"))
        button.wait_for(timeout=90_000)
        with page.expect_download(timeout=30_000) as info:
            button.click()
        saved[ext] = Path(info.value.path()).read_bytes()
    assert saved["png"][:8] == b"\x89PNG\r\n\x1a\n" and len(saved["png"]) > 10_000
    assert b"<svg" in saved["svg"][:500] and b"</svg>" in saved["svg"][-200:]
    _no_exception(page)


# true when the sidebar picker labelled arg[0] shows arg[1] (as text, or as the value of its input)
_SIDEBAR_PICKS = """([label, value]) =>
    [...document.querySelectorAll('[data-testid="stSidebar"] [data-testid="stSelectbox"]')]
    .some(box => box.querySelector('label') && box.querySelector('label').innerText.trim() === label
              && (box.innerText.includes(value)
                  || [...box.querySelectorAll('input')].some(i => i.value.includes(value))))"""


@pytest.mark.timeout(1800)
def test_first_time_user_gets_a_demo_comparison_and_a_report(tmp_path_factory, demo_assets, browser):
    """Issue 6's 'done when': from an empty install, one button gives a finished GradDiff vs MANSU comparison
    (real backend runs, the demo world's settings), and the Report page downloads the reviewer report."""
    from mansu.runs.store import list_runs
    from mansu.spec import run_label

    home, runs = _fresh_home(tmp_path_factory.mktemp("first-time"), demo_assets)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    try:
        with _serve(home, runs) as url:
            _open(page, url)
            page.get_by_role("button", name="Build and run the demo").click()
            deadline = time.time() + 1500
            done = []
            while time.time() < deadline and len(done) < 2:
                states = [r.status.get("state") for r in list_runs(runs)]
                assert "failed" not in states and "cancelled" not in states, states
                done = [s for s in states if s == "finished"]
                time.sleep(5)
            assert len(done) == 2, f"demo comparison did not finish in time: {states}"
            by_method = {r.config["spec"]["unlearn"]["method"]: r for r in list_runs(runs)}
            assert sorted(by_method) == ["graddiff", "mansu"]
            label = {m: run_label(r.run_id, r.config) for m, r in by_method.items()}  # what the pickers show
            # the finished comparison opens by itself: MANSU selected, compared with GradDiff
            page.locator("[data-testid='stAlert']", has_text="is selected, compared with").wait_for(timeout=60_000)
            page.wait_for_function(_SIDEBAR_PICKS, arg=["compare with", label["graddiff"]], timeout=30_000)
            page.wait_for_function(_SIDEBAR_PICKS, arg=["run", label["mansu"]], timeout=30_000)
            page.screenshot(path=str(SHOTS / "03-demo-finished.png"), full_page=True)
            html = _download_report(page, url)
            assert "meaningful forgetting" in html and html.count("Plotly.newPlot") >= 5
            page.screenshot(path=str(SHOTS / "04-demo-report.png"), full_page=True)
            _no_exception(page)
    finally:
        page.screenshot(path=str(SHOTS / "03-demo-last-state.png"), full_page=True)  # for a failure's post-mortem
        ctx.close()
