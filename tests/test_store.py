"""The run store: atomic creation, validated ids, dead processes shown as failed, listing and loading."""

import json
import subprocess
import sys

import pytest

from mansu.runs import layout
from mansu.runs.store import (create_run, delete_run, list_runs, load_run, read_status, update_metrics,
                              validate_run_id, write_status)


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


@pytest.mark.parametrize("bad", ["../etc", "20260101-000000-../../x", "20260101-000000-A", "x", "", "20260101-000000-a/b"])
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
    update_metrics(second, "base_fp", {"forget": 1.0})
    update_metrics(second, "unlearned_fp", {"forget": 0.2})
    runs = list_runs()
    assert [r.run_id for r in runs] == sorted([first.name, second.name], reverse=True)
    loaded = load_run(second.name)
    assert loaded.metrics == {"base_fp": {"forget": 1.0}, "unlearned_fp": {"forget": 0.2}}
    write_status(second, "done", state="finished")
    assert load_run(second.name).status["state"] == "finished"
    delete_run(first.name)
    assert [r.run_id for r in list_runs()] == [second.name]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_run(first.name)
