"""App-side backend control: form validation, the command line, progress and ETA, readable backend
errors, and a real separate process found by its pid, then cancelled."""

import datetime as dt
import sys
import time

import pytest

from mansu.appstate import (LaunchSpec, backend_error, build_command, cancel_run, find_run_for_pid, progress_of,
                            start_backend, validate_spec)
from mansu.runs.store import load_run


def test_validate_spec_rejects_bad_input(tmp_path):
    validate_spec(LaunchSpec(method="mansu", demo=True))
    with pytest.raises(ValueError, match="unknown method 'nope': accepted are mansu"):
        validate_spec(LaunchSpec(method="nope"))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        validate_spec(LaunchSpec(device="tpu"))
    with pytest.raises(ValueError, match="unknown base alignment"):
        validate_spec(LaunchSpec(base_alignment="int8"))
    with pytest.raises(ValueError, match="model path or id is empty"):
        validate_spec(LaunchSpec(demo=False))
    with pytest.raises(FileNotFoundError, match="forget file"):
        validate_spec(LaunchSpec(demo=False, model="m", forget=str(tmp_path / "no.jsonl"), retain="r"))
    with pytest.raises(ValueError, match="must be >= 0"):
        validate_spec(LaunchSpec(hparams={"lr": -1.0}))
    with pytest.raises(ValueError, match="bad hyperparameter name"):
        validate_spec(LaunchSpec(hparams={"lr; rm": 1}))


def test_build_command_flags(tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text("{}\n")
    cmd = build_command(LaunchSpec(method="npo", demo=False, model="m", forget=str(f), retain=str(f), device="cpu",
                                   base_alignment="nf4-grid",
                                   hparams={"lr": 1e-5, "update_fraction": 0.01, "rmu_alpha": 100.0, "beta": None}))
    assert cmd[:4] == [sys.executable, "-m", "mansu", "run"]
    assert cmd[cmd.index("--method") + 1] == "npo" and cmd[cmd.index("--model") + 1] == "m"
    assert cmd[cmd.index("--update-fraction") + 1] == "0.01" and cmd[cmd.index("--set") + 1] == "rmu_alpha=100.0"
    assert cmd[cmd.index("--base-alignment") + 1] == "nf4-grid" and "--beta" not in cmd and "--demo" not in cmd
    assert "--demo" in build_command(LaunchSpec())


def test_command_is_accepted_by_the_backend_parser(tmp_path):
    from mansu.cli import build_parser

    cmd = build_command(LaunchSpec(method="ga", hparams={"steps": 3, "lr": 1e-5, "retain_weight": 2.0}))
    args = build_parser().parse_args(cmd[3:])
    assert (args.method, args.steps, args.lr, args.demo, args.set) == ("ga", 3, 1e-5, True, ["retain_weight=2.0"])



def test_demo_button_runs_the_results_settings():
    """The app's demo comparison uses the settings of docs/results.md, and the backend builds exactly them."""
    from mansu.cli import build_parser
    from mansu.commands.run import _unlearn_overrides
    from mansu.unlearn.demo_settings import demo_settings
    from ui.launch import demo_commands

    (graddiff, _), (mansu, _) = demo_commands()
    for cmd, method in ((graddiff, "graddiff"), (mansu, "mansu")):
        args = build_parser().parse_args(cmd[3:])
        assert args.method == method and args.demo and args.base_alignment == "nf4-grid"
        assert _unlearn_overrides(args) == {"method": method, **demo_settings(method)}

def test_progress_and_eta():
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
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


def test_start_find_and_cancel_a_real_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MANSU_RUNS", str(tmp_path / "runs"))
    script = ("from mansu.runs.store import create_run, write_status; import time; "
              "r = create_run({'method': 'ga'}, 'proc'); write_status(r, 'unlearn', 1, 10); time.sleep(60)")
    proc, info = start_backend([sys.executable, "-c", script], label="t")
    deadline = time.time() + 30
    run_id = None
    while run_id is None and time.time() < deadline:
        run_id = find_run_for_pid(info.pid)
        time.sleep(0.1)
    assert run_id is not None
    assert load_run(run_id).status["state"] == "running"
    cancel_run(info.pid, run_id)
    assert proc.wait(10) != 0
    status = load_run(run_id).status
    assert status["state"] == "cancelled" and status["error"] == "cancelled by the user"
    assert info.log_path.is_file()
