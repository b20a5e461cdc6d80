"""AppTest for every page: no exception, the expected widgets and charts, the floor preview moving
with kappa, the report written, and "not computed for this run" (never an exception) on a run
that holds no artifacts yet."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from mansu.runs.store import create_run, write_status
from mansu.testing import write_sample_run

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ("views/runs.py", "views/circuit.py", "views/update_nf4.py", "views/before_after.py", "views/launch.py",
         "views/report.py")   # the pages of a run (views/science.py reads docs/, not runs: its own test)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(tmp_path))
    monkeypatch.setenv("MANSU_RUNS", str(tmp_path / "runs"))
    return tmp_path


@pytest.fixture
def sample_runs(home):
    return [write_sample_run(home / "runs", "mansu", 0, 0.3), write_sample_run(home / "runs", "ga", 1, 0.6)]


def _page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_empty_install_shows_one_action(home):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Build and run the demo"]
    assert "No runs yet" in at.markdown[0].value


def test_runs_table(sample_runs):
    at = _page("views/runs.py")
    table = at.dataframe[0].value
    assert len(table) == 2
    assert set(table["method"]) == {"mansu", "ga"}
    row = table[table["method"] == "mansu"].iloc[0]
    assert row["passed"] == "3/4" and row["forget fp"] == 0.3 and row["PTQ gap"] == pytest.approx(0.02)
    assert {b.label for b in at.button} >= {"Open", "Compare", "Delete"}


def test_run_link_selects_the_run_and_follows_the_picker(sample_runs):
    """?run=<id> opens the app on that run; picking another run rewrites the link; an unknown id is ignored."""
    default = AppTest.from_file(APP, default_timeout=60).run().session_state["run_id"]
    (linked,) = [r.name for r in sample_runs if r.name != default]
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = linked
    at.run()
    assert not at.exception and at.session_state["run_id"] == linked
    at.selectbox(key="run_id").set_value(default).run()
    assert at.session_state["run_id"] == default and at.query_params["run"] == default
    stale = AppTest.from_file(APP, default_timeout=60)
    stale.query_params["run"] = "20990101-000000-no-such-run"
    stale.run()
    assert not stale.exception and stale.session_state["run_id"] == default


def test_delete_needs_confirmation(sample_runs):
    at = _page("views/runs.py")
    victim = at.selectbox(key="runs-delete").value
    at.checkbox(key="runs-delete-confirm").check().run()
    at.button(key="delete-run").click().run()
    assert not at.exception
    assert not (sample_runs[0].parent / victim).exists()
    at.run()
    assert len(at.dataframe[0].value) == 1 and victim not in set(at.dataframe[0].value["run"])


def test_circuit_page_controls_and_pin(sample_runs):
    at = _page("views/circuit.py")
    assert _charts(at) == 1
    assert at.radio(key="circuit-stage").options == ["before", "after (fp)", "after (NF4)"]
    at.multiselect(key="circuit-pins").select("m0").run()
    assert not at.exception
    assert len(at.dataframe) == 2 and len(at.dataframe[0].value) > 0
    at.radio(key="circuit-stage").set_value("after_nf4").run()
    assert not at.exception and _charts(at) == 1


def test_update_page_floor_preview_moves(sample_runs):
    at = _page("views/update_nf4.py")
    assert _charts(at) == 2
    assert any("median update" in m.value for m in at.markdown)
    before = {m.label: m.value for m in at.metric}
    assert "n updated" in before and "fisher cost" in before
    at.slider(key="floor-kappa").set_value(3.0).run()
    after = {m.label: m.value for m in at.metric}
    assert after["kappa"] == "3" and after["fisher cost"] != before["fisher cost"]


def test_before_after_page(sample_runs):
    at = _page("views/before_after.py")
    assert _charts(at) >= 5  # before, after, diff, CAD, quadrant, bars


def test_before_after_ptq_gap_matrix(home):
    """The method x quantizer heatmap pools every run on the selected run's model and data by method and base; a
    folder whose runs hold no per-question quantizer results gets the notice instead."""
    import json

    write_sample_run(home / "runs", "ga", 1, 0.6)
    at = _page("views/before_after.py")
    assert not at.get("plotly_chart") or all("ba-matrix" not in str(c.proto) for c in at.get("plotly_chart"))
    assert any("PTQ gap per quantizer with per-question results" in i.value for i in at.info)
    recall = {"nf4": 0.5, "fp4": 0.4, "int8": 0.0, "int4-g128": 0.3}
    write_sample_run(home / "runs", "graddiff", 0, 0.3, quant_recall=recall)
    write_sample_run(home / "runs", "mansu", 1, 0.3, quant_recall={q: 0.0 for q in recall})
    write_sample_run(home / "runs", "mansu", 2, 0.3, quant_recall={"nf4": 0.0}, base_alignment="natural")
    at = _page("views/before_after.py")
    # the default base follows the selected (newest) run, which depends on the second each run was written in
    at.radio(key="ba-matrix-base").set_value("nf4-grid").run()
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "forget PTQ gap" in c.proto.spec)
    heat = spec["data"][0]
    assert heat["type"] == "heatmap" and heat["x"] == list(recall) and sorted(heat["y"]) == ["graddiff", "mansu"]
    assert heat["z"][heat["y"].index("graddiff")][0] == pytest.approx(0.5) and "95% CI [" in heat["customdata"][0][0]
    assert at.radio(key="ba-matrix-base").options == ["nf4-grid", "natural"]


def test_launch_rejects_bad_input_before_start(sample_runs):
    at = _page("views/launch.py")
    at.checkbox(key="launch-demo").uncheck()
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    assert any("not started: model path or id is empty" in e.value for e in at.error)


def test_report_written(sample_runs, home):
    at = _page("views/report.py")
    at.button(key="report-build").click().run()
    assert not at.exception
    reports = list((home / "exports").glob("*/report.html"))
    assert len(reports) == 1 and reports[0].stat().st_size > 1_000_000
    text = reports[0].read_text(encoding="utf-8")
    assert sum(run.name in text for run in sample_runs) == 1  # no "compare with": the selected run only


def test_report_compares_with_the_sidebar_run_only(sample_runs, home):
    extra = write_sample_run(home / "runs", "npo", 2, 0.5)  # in the folder, never picked: not in the report
    at = _page("views/report.py")
    selected, other = (r.name for r in sample_runs)
    at.selectbox(key="run_id").select(selected).run()
    at.selectbox(key="compare_id").select(other).run()
    at.button(key="report-build").click().run()
    assert not at.exception
    text = (home / "exports" / selected / "report.html").read_text(encoding="utf-8")
    assert selected in text and other in text and extra.name not in text
    assert text.index("<section id='claim'>") < text.index("For comparison")


@pytest.mark.parametrize("page", PAGES)
def test_run_without_artifacts_says_not_computed(home, page):
    run = create_run({"method": "mansu", "demo": True}, "bare", home / "runs")
    write_status(run, "attribution", 0, 3)
    at = _page(page)
    if page not in ("views/runs.py", "views/launch.py"):
        texts = [i.value for i in at.info] + [c.value for c in at.caption]
        assert any("not computed for this run" in t for t in texts), texts


def test_a_queue_survives_the_tab_and_any_tab_cancels_it(home, tmp_path):
    """A two-run queue is one backend process; a fresh session (another tab, the launching one closed) shows both
    runs with their progress and cancels the whole queue."""
    import time

    from mansu.launch import launch_runs, runs_of_pid
    from mansu.spec import RunSpec
    from mansu.testing import write_tiny_world
    from mansu.unlearn.config import UnlearnConfig

    world = write_tiny_world(tmp_path / "world")
    spec = RunSpec(model=world["model"], forget=world["forget"], retain=world["retain"], attribution=False,
                   unlearn=UnlearnConfig(method="graddiff", steps=100_000, batch_size=4))
    proc, info = launch_runs([spec, spec.replace(unlearn=UnlearnConfig(method="ga", steps=3, batch_size=4))], "q")
    deadline = time.time() + 600  # the backend imports torch and checks the inputs first: slow on a loaded machine
    while len(runs_of_pid(info.pid)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    first, second = runs_of_pid(info.pid)
    assert second.status["state"] == "queued"
    at = _page("views/launch.py")  # a new session: it never saw the launch
    shown = " ".join(m.value for m in at.markdown)
    assert first.run_id in shown and second.run_id in shown
    at.button(key=f"cancel-{first.run_id}").click().run()
    assert not at.exception and proc.wait(30) != 0
    from mansu.runs.store import load_run

    assert {load_run(r.run_id).status["state"] for r in (first, second)} == {"cancelled"}


def test_science_page_shows_each_docs_page_with_its_figures(home):
    from mansu.viz.science import page_blocks, science_pages

    pages = science_pages()
    assert [p.path.name for p in pages][:2] == ["results.md", "frontiers.md"]    # the repo's docs/ holds them
    blocks = page_blocks(next(p.path for p in pages if p.path.name == "frontiers.md"))
    assert [b.figure.name for b in blocks if b.kind == "figure"] == ["frontiers.png"]
    at = _page("views/science.py")
    assert at.selectbox[0].options[0] == pages[0].title
    at.selectbox[0].set_value(next(p.title for p in pages if p.path.name == "frontiers.md")).run()
    assert not at.exception and len(at.get("image")) == 1
    assert any("Verdict" in m.value for m in at.markdown)


def test_science_blocks_keep_text_and_missing_figures(tmp_path):
    from mansu.viz.science import page_blocks

    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "p.md").write_text("# T\n\ntext\n![fig a](a.png)  ([SVG](a.svg))\n![gone](b.png)\nend\n")
    blocks = page_blocks(tmp_path / "p.md")
    assert [b.kind for b in blocks] == ["markdown", "figure", "markdown"]
    assert blocks[1].figure == tmp_path / "a.png" and blocks[1].text == "fig a"
    assert "![gone](b.png)" in blocks[2].text and "end" in blocks[2].text
