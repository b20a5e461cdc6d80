"""The run store: atomic creation, validated ids, dead processes shown as failed, listing and loading."""

import json
import subprocess
import sys

import pytest

from mansu.runs import layout
from mansu.runs.store import (
    create_run,
    delete_run,
    list_runs,
    load_run,
    read_cad,
    read_metrics,
    read_status,
    update_metrics,
    validate_run_id,
    write_cad,
    write_status,
)


def test_create_run_stamps_config_and_status(tmp_runs):
    run = create_run({"method": "mansu"}, "Demo MANSU!")
    config = json.loads((run / layout.CONFIG).read_text())
    assert run.name.endswith("-demo-mansu") and config["run_id"] == run.name
    assert config["method"] == "mansu" and "torch" in config["versions"] and config["_stamp"]["mansu_version"]
    assert "host" in config["device_info"]
    assert read_status(run)["state"] == "running"


def test_same_second_runs_get_distinct_ids(tmp_runs):
    ids = {create_run({}, "x").name for _ in range(3)}
    assert len(ids) == 3 and all(validate_run_id(i) for i in ids)


@pytest.mark.parametrize("bad", ["../etc", "20260101-000000-../../x", "20260101-000000-A", "x", "",
                                 "20260101-000000-a/b",
                                 "20260101-000000-ab\n", "20260101-000000-ab\r", "20260101-000000-1-ab\n"])
def test_run_ids_are_validated(bad, tmp_runs):
    with pytest.raises(ValueError, match="invalid run id"):
        load_run(bad)


def test_failed_creation_leaves_no_folder(tmp_runs):
    with pytest.raises(TypeError):
        create_run({"not_json": object()}, "bad")
    assert list(tmp_runs.iterdir()) == []


def test_dead_process_is_reported_failed(tmp_runs):
    run = create_run({}, "dead")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_status(run, "unlearn", 3, 10)
    status = json.loads((run / layout.STATUS).read_text())
    status["pid"] = int(proc.stdout)  # a process that has exited
    (run / layout.STATUS).write_text(json.dumps(status))
    shown = read_status(run)
    assert shown["state"] == "failed" and "died during stage 'unlearn'" in shown["error"]


def test_list_load_metrics_delete(tmp_runs):
    first = create_run({"method": "ga"}, "a")
    second = create_run({"method": "npo"}, "b")
    (tmp_runs / ".tmp-half-written").mkdir()
    update_metrics(second, "base_fp", {"forget": {"accuracy": 1.0}})
    update_metrics(second, "unlearned_fp", {"forget": {"accuracy": 0.2}})
    runs = list_runs()
    assert [r.run_id for r in runs] == sorted([first.name, second.name], reverse=True)
    loaded = load_run(second.name)
    assert loaded.metrics == {"base_fp": {"forget": {"accuracy": 1.0}}, "unlearned_fp": {"forget": {"accuracy": 0.2}}}
    assert loaded.corrupt is None and loaded.scorecard == {} and loaded.cad is None
    write_status(second, "done", state="finished")
    assert load_run(second.name).status["state"] == "finished"
    delete_run(first.name)
    assert [r.run_id for r in list_runs()] == [second.name]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_run(first.name)


def test_metrics_writer_refuses_a_wrong_shape_and_leaves_the_file(tmp_runs):
    run = create_run({}, "m")
    update_metrics(run, "base_fp", {"forget": {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}})
    with pytest.raises(ValueError,
                       match=r"metrics.json \(writing 'ptq_gap'\): ptq_gap.forget.gap must be a number, got 'x'"):
        update_metrics(run, "ptq_gap", {"forget": {"gap": "x"}})
    assert read_metrics(run) == {"base_fp": {"forget": {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}}}


def test_cad_writer_and_reader(tmp_runs):
    run = create_run({}, "c")
    assert read_cad(run) is None
    write_cad(run, {"status": "ok", "after_nf4": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5,
                                                  "per_edge": {"a->b": 0.1}}})
    assert read_cad(run)["after_nf4"]["value"] == 0.4
    with pytest.raises(ValueError,
                       match=r"cad.json \(writing\): after_fp.per_edge must be an object of edge -> number"):
        write_cad(run, {"after_fp": {"value": 0.1, "per_edge": [["a", "b"]]}})
    (run / layout.CAD).write_text('{"after_fp": {"value": "high"}}')
    with pytest.raises(ValueError, match=r"cad.json: after_fp.value must be a number, got 'high'"):
        read_cad(run)


def test_exports_carry_no_absolute_paths(tmp_path, monkeypatch):
    """The report and the circuit-tracer export name models and data relative to MANSU_HOME or by file name."""
    import torch

    from mansu.attribution.eap import AttributionGraph
    from mansu.attribution.serialize import save_graph
    from mansu.io import portable_path
    from mansu.scorecard import build_scorecard
    from mansu.viz.report import build_report_html

    home = tmp_path / "home"
    monkeypatch.setenv("MANSU_HOME", str(home))
    monkeypatch.setenv("MANSU_RUNS", str(home / "runs"))
    assert portable_path(str(home / "demo" / "model")) == "$MANSU_HOME/demo/model"
    assert portable_path(str(home / "runs" / "r1" / "model")) == "$MANSU_RUNS/r1/model"
    assert portable_path("/srv/alice/data/forget.jsonl") == "forget.jsonl"
    assert portable_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"  # a hub id is not a path

    config = {"spec": {"model": str(home / "demo" / "model"), "forget": "/srv/alice/data/forget.jsonl"}}
    html = build_report_html("r", {}, build_scorecard({}, None), config, {"host": "vm"},
                             notes=["/srv/alice/data/retain.jsonl"])
    assert "/srv/alice" not in html and str(home) not in html
    assert "$MANSU_HOME/demo/model" in html and "forget.jsonl" in html and "retain.jsonl" in html

    run = create_run({}, "graph", home / "runs")
    graph = AttributionGraph(["input", "a0.h0"], ["a0.h0", "logits"], torch.tensor([[0.5, 0.1], [0.0, 0.3]]),
                             torch.tensor([[True, True], [False, True]]), torch.zeros(1), torch.zeros(1),
                             metadata={"model": "/srv/alice/models/llama", "n_layers": 1, "n_heads": 1})
    save_graph(graph, run, "before")
    for path in (layout.attribution_json(run, "before"), layout.attribution_tracer_json(run, "before")):
        text = path.read_text()
        assert "/srv/alice" not in text and str(tmp_path) not in text and '"llama"' in text
