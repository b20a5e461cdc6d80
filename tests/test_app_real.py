"""AppTest of every page on a run produced by the real backend (`mansu.pipeline`, MANSU on the demo world with
the smallest settings that still exercise every stage): no exception, the charts and the floor preview present,
nothing reported missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, demo_assets):
    """One finished MANSU run of the real pipeline (every stage; small attribution and evaluation sizes)."""
    from mansu.pipeline import run_pipeline, start_run
    from mansu.spec import RunSpec

    root = tmp_path_factory.mktemp("real") / "runs"
    spec = RunSpec(model=str(demo_assets.model_dir), forget=str(demo_assets.forget_path),
                   retain=str(demo_assets.retain_path), base_alignment="nf4-grid",
                   unlearn={"method": "mansu", "steps": 1, "n_fisher": 8, "k": 4, "batch_size": 8},
                   attribution_records=16, ig_steps=1, retain_eval_limit=20, save_model=False)
    run = start_run(spec, root=root)
    run_pipeline(run)
    return run


@pytest.fixture
def app_env(real_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(tmp_path))
    monkeypatch.setenv("MANSU_RUNS", str(real_run.parent))
    return real_run


EXPECTED_CHARTS = {"views/runs.py": 0, "views/circuit.py": 1, "views/update_nf4.py": 2, "views/before_after.py": 5,
                   "views/launch.py": 0, "views/report.py": 0}


@pytest.mark.parametrize("page", list(EXPECTED_CHARTS))
def test_every_page_on_a_real_run(app_env, page):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) >= EXPECTED_CHARTS[page]
    notices = [i.value for i in at.info]
    assert not any("not computed" in n for n in notices), notices
    if page == "views/circuit.py":
        # the real pipeline writes every stage's circuit-tracer export, and the page offers it
        assert (app_env / "attribution" / "before.circuit-tracer.json").is_file()
        assert "circuit-tracer JSON" in [b.proto.label for b in at.get("download_button")]
    if page == "views/update_nf4.py":
        metrics = {m.label: m.value for m in at.metric}
        assert int(metrics["n candidates"].replace(",", "")) > 0
        assert any(m.value.startswith("### the median update is") for m in at.markdown)
    if page == "views/runs.py":
        row = at.dataframe[0].value.iloc[0]
        assert row["state"] == "finished" and row["alignment"] == "nf4-grid" and row["passed"] != "-"


def test_apply_kappa_starts_a_child_run_of_the_backend(app_env):
    """"Apply and evaluate" launches the child's RunSpec (`python -m mansu run --spec FILE`: the parent's spec with
    the new kappa and `parent_run`); the backend accepts it and creates a child run that reuses the parent's
    circuit (then we cancel it)."""
    import json
    import time

    from mansu.launch import cancel_run, find_run_for_pid
    from mansu.runs.store import artifact, load_run

    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/update_nf4.py").run()
    at.slider(key="floor-kappa").set_value(1.5).run()
    at.button(key="floor-apply").click().run()
    assert not at.exception
    entry = at.session_state["_launches"][0]
    info = entry["info"]
    assert info.command[3:5] == ["run", "--spec"]
    (launched,) = json.loads(open(info.command[5]).read())
    assert launched["parent_run"] == app_env.name and launched["unlearn"]["kappa"] == 1.5
    child = None
    deadline = time.time() + 300
    while child is None and time.time() < deadline and entry["proc"].poll() is None:
        child = find_run_for_pid(info.pid, app_env.parent)
        time.sleep(0.5)
    try:
        assert child is not None, info.log_path.read_text()[-2000:]
        spec = load_run(child, app_env.parent).config["spec"]
        assert spec["parent_run"] == app_env.name and spec["unlearn"]["kappa"] == 1.5
        # the parent's circuit, reused by reference (inherited.json), not copied
        assert artifact(app_env.parent / child, "circuit.json") == app_env / "circuit.json"
    finally:
        if child is not None:
            cancel_run(child, app_env.parent)
        entry["proc"].wait(30)
