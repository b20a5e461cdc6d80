"""App-side backend control: launches validated before any process starts, the spec file the backend reads, the
demo button's runs, progress and ETA, readable backend errors, and real separate processes found in the store and
cancelled by run id (from any tab)."""

import datetime as dt
import sys
import time

import pytest

from mansu.launch import (
    active_runs,
    backend_error,
    cancel_run,
    find_run_for_pid,
    progress_of,
    run_command,
    spec_file,
    start_backend,
)
from mansu.runs.store import load_run
from mansu.spec import RunSpec, demo_spec, specs_from_file
from mansu.unlearn.config import UnlearnConfig


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MANSU_RUNS", str(tmp_path / "runs"))
    return tmp_path


def test_a_bad_spec_is_refused_before_any_file_or_process(home, tmp_path):
    with pytest.raises(ValueError, match="device 'tpu' is not supported; accepted are cpu, cuda, auto"):
        RunSpec(device="tpu")
    with pytest.raises(ValueError, match="lr must be a number in"):
        demo_spec("mansu", lr=-1.0)
    with pytest.raises(ValueError, match="give forget and retain data files"):
        RunSpec(model=str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "f.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    spec = RunSpec(model=str(tmp_path / "model"), forget=str(tmp_path / "f.jsonl"), retain=str(tmp_path / "no.jsonl"))
    with pytest.raises((ValueError, FileNotFoundError)):
        spec_file([spec], "bad")
    assert not (home / "home" / "launches").exists()  # nothing written for a refused launch


def test_the_backend_reads_back_exactly_the_launched_specs(home):
    from mansu.cli import build_parser
    from mansu.commands.run import build_specs

    specs = [demo_spec("graddiff"), demo_spec("mansu", kappa=1.5, seed=3)]
    path = spec_file(specs, "queue")
    assert specs_from_file(path) == specs
    args = build_parser().parse_args(run_command(path)[3:])
    assert build_specs(args) == specs


def test_run_demo_and_the_demo_button_and_compare_build_the_same_spec():
    """`run --demo --method M` (the README's example), the app's demo button and `compare` share one source."""
    from mansu.cli import build_parser
    from mansu.commands.run import build_specs
    from mansu.unlearn.demo_settings import demo_settings
    from ui.launch import DEMO_METHODS, demo_specs

    for method, spec in zip(DEMO_METHODS, demo_specs()):
        args = build_parser().parse_args(["run", "--demo", "--method", method])
        assert build_specs(args) == [spec]
        assert spec.base_alignment == "nf4-grid" and spec.model == "demo"
        assert spec.unlearn == UnlearnConfig(**{**demo_settings(method), "method": method})


def test_progress_and_eta():
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    prog = progress_of({"stage": "unlearn", "step": 25, "total": 100, "state": "running",
                        "started_at": start.isoformat()}, now=start + dt.timedelta(seconds=10))
    assert prog.fraction == 0.25 and prog.eta_s == pytest.approx(30.0)
    assert "stage unlearn · step 25/100 · ETA 30 s" in prog.text
    assert progress_of({"state": "finished", "stage": "done"}).fraction == 1.0
    assert progress_of({"state": "running", "step": 1, "total": 4, "eta_s": 7}).eta_s == 7.0


def test_backend_error_is_readable():
    assert backend_error("loading\nerror: forget file 'x' not found\n") == "forget file 'x' not found"
    assert backend_error("Traceback...\n  File x\nRuntimeError: boom") == "RuntimeError: boom"
    assert backend_error("all good") is None


def _fake_backend(n_runs: int) -> str:
    """A process that creates a queue of runs in the store as the backend does, then works for a minute."""
    return ("from mansu.runs.store import create_run, write_status; import time; "
            f"rs = [create_run({{'method': 'ga'}}, 'proc') for _ in range({n_runs})]; "
            "write_status(rs[0], 'unlearn', 1, 10); [write_status(r, 'queued', state='queued') for r in rs[1:]]; "
            "time.sleep(60)")


def test_start_find_and_cancel_a_real_process_from_the_store(home):
    proc, info = start_backend([sys.executable, "-c", _fake_backend(2)], label="t")
    deadline = time.time() + 30
    while len(active_runs()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    run_id = find_run_for_pid(info.pid)
    assert run_id is not None and load_run(run_id).status["state"] == "running"
    assert sorted(r.status["state"] for r in active_runs()) == ["queued", "running"]
    cancel_run(run_id)  # by run id only: what any tab, or `mansu runs`, knows
    assert proc.wait(10) != 0
    for run in (load_run(r.run_id) for r in __import__("mansu.runs.store", fromlist=["list_runs"]).list_runs()):
        assert run.status["state"] == "cancelled" and run.status["error"] == "cancelled by the user"
    assert not active_runs() and info.log_path.is_file()


def test_mansu_runs_shows_a_queue_and_cancels_it(home):
    """The queue is visible and cancellable from the terminal too (`mansu runs`, `mansu runs --cancel ID`)."""
    import subprocess

    proc, info = start_backend([sys.executable, "-c", _fake_backend(2)], label="t")
    deadline = time.time() + 30
    while len(active_runs()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    listing = subprocess.run([sys.executable, "-m", "mansu", "runs"], capture_output=True, text=True, check=True)
    assert " running " in listing.stdout and " queued " in listing.stdout
    run_id = find_run_for_pid(info.pid)
    out = subprocess.run([sys.executable, "-m", "mansu", "runs", "--cancel", run_id], capture_output=True, text=True)
    assert out.returncode == 0 and proc.wait(10) != 0
    assert not active_runs()
