"""`python -m mansu attribute`: a real EAP-IG run on the demo model saved as a run folder that reloads, exports to
circuit-tracer's shape and opens on every app page; bad input ends in one line before any folder is made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_cli import mansu, one_line_error

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ("views/runs.py", "views/circuit.py", "views/update_nf4.py", "views/before_after.py", "views/report.py")


@pytest.fixture(scope="module")
def attribution_run(tmp_path_factory, demo_assets):
    runs = tmp_path_factory.mktemp("attr") / "runs"
    out = mansu("attribute", "--model", str(demo_assets.model_dir), "--data", str(demo_assets.forget_path),
                "--records", "24", "--ig-steps", "2", "--json", env_extra={"MANSU_RUNS": str(runs)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), runs


def test_saves_a_reloadable_graph_circuit_and_tracer_export(attribution_run):
    from mansu.attribution.serialize import load_circuit, load_graph
    from mansu.runs.store import load_run

    summary, runs = attribution_run
    run = Path(summary["run_dir"])
    assert run.parent == runs and load_run(run.name, runs).status["state"] == "finished"
    graph = load_graph(run, "before")
    circuit, masks = load_circuit(run)
    assert int(graph.valid.sum()) == summary["edges"] == 134  # 2 layers x 8 heads demo model
    assert len(circuit.edges) == summary["circuit_edges"] > 0 and circuit.faithfulness == summary["faithfulness"]
    assert summary["reached"] == (summary["faithfulness"] >= 0.8) and any(m.any() for m in masks.values())
    tracer = json.loads((run / "attribution" / "before.circuit-tracer.json").read_text())
    assert set(tracer) >= {"metadata", "nodes", "links"} and len(tracer["links"]) == len(circuit.edges)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_opens_the_attribution_run(attribution_run, monkeypatch, page):
    _, runs = attribution_run
    monkeypatch.setenv("MANSU_RUNS", str(runs))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    if page == "views/circuit.py":
        assert len(at.get("plotly_chart")) >= 1


def test_bad_input_makes_no_run_folder(tmp_path, demo_assets):
    runs = tmp_path / "runs"
    env = {"MANSU_RUNS": str(runs)}
    assert "--records must be a positive integer" in one_line_error(
        mansu("attribute", "--demo", "--records", "0", env_extra=env))
    assert "give --demo, or both --model and --data" in one_line_error(
        mansu("attribute", "--model", str(demo_assets.model_dir), env_extra=env))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in one_line_error(mansu("attribute", "--model", str(demo_assets.model_dir), "--data", str(empty),
                                           env_extra=env))
    assert not runs.exists() or not any(runs.iterdir())
