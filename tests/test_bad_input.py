"""Bad input through the real CLI (`python -m mansu ...` in a subprocess) and the app's Runs page (AppTest).

Every refusal is one exact `error: ...` line with exit code 2 and leaves no run folder; a run folder whose files
cannot be read is listed as `corrupt` with the reason while every other run still shows; six processes creating
a run in the same second all succeed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

from mansu.runs import layout
from mansu.runs.store import RunState, create_run, write_status
from mansu.testing import write_sample_run, write_tiny_world
from ui.state import RUN_KEY

APP = str(REPO / "app.py")
MCQ = {"question": "Where was Zorvath born?", "choices": ["Quorvel", "Varnoth", "Pellucor", "Obrecant"], "answer": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A tiny saved Llama (64 positions, word-level tokenizer) with forget and retain MCQ files."""
    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A home and an empty run store of this test's own."""
    return {**os.environ, "MANSU_HOME": str(tmp_path / "home"), "MANSU_RUNS": str(tmp_path / "runs")}


def mansu(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mansu", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    """stderr's `error:` lines (transformers' progress bars share stderr)."""
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def assert_refused(out: subprocess.CompletedProcess, env: dict[str, str], expected: str) -> None:
    assert error_lines(out) == [expected], out.stderr[-2000:]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    runs = Path(env["MANSU_RUNS"])
    assert not runs.exists() or list(runs.iterdir()) == []  # no run folder, no hidden temp folder


# ---------------------------------------------------------------- data files


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the exact error line it must give)."""
    dup = tmp / "dup.jsonl"
    dup.write_text('{"question": "a", "question": "b", "choices": ["x", "y"], "answer": 0}\n')
    binary = tmp / "image.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    folder = tmp / "folder.jsonl"
    folder.mkdir()
    huge = tmp / "huge.jsonl"  # the 10 MB single-line record of the issue: 5M words
    huge.write_text(json.dumps({**MCQ, "question": " ".join(["x"] * 5_000_000)}) + "\n")
    wide = tmp / "wide.jsonl"
    wide.write_text(json.dumps(MCQ) + "\n" + json.dumps({**MCQ, "question": "y" * 200_000}) + "\n")
    return {
        "duplicated key": (dup,
                           f"error: {dup}:1: duplicated key 'question' in one JSON object; each key may appear once"),
        "binary": (binary, f"error: {binary}:1: not UTF-8 text (byte 0x89 at column 1); accepted are UTF-8 text files "
                           "(.jsonl, .json, .csv) or Parquet"),
        "folder": (folder, f"error: {folder}: is a folder; give a data file (.jsonl, .json, .csv, .parquet)"),
        "10 MB line": (huge, f"error: {huge}:1: line is {huge.stat().st_size:,} characters long; the limit is "
                             "1,000,000 per record (a record must fit a model's context)"),
        "long field": (wide, f"error: {wide}:2: field 'question' is 200,000 characters long; the limit is 100,000 "
                             "(a record must fit a model's context)"),
    }


@pytest.mark.parametrize("case", ["duplicated key", "binary", "folder", "10 MB line", "long field"])
def test_eval_refuses_bad_data_files_at_once(case, env, tmp_path, world):
    path, expected = _bad_files(tmp_path)[case]
    t0 = time.perf_counter()
    out = mansu(env, "eval", "--model", world["model"], "--data", str(path), timeout=120)
    assert_refused(out, env, expected)
    assert time.perf_counter() - t0 < 60  # read-time checks: no model work, no 15-minute silence


@pytest.mark.parametrize("case", ["duplicated key", "binary", "folder", "10 MB line"])
def test_run_refuses_bad_data_before_creating_a_folder(case, env, tmp_path, world):
    path, expected = _bad_files(tmp_path)[case]
    out = mansu(env, "run", "--method", "ga", "--model", world["model"], "--forget", str(path),
                "--retain", world["retain"], "--steps", "1", "--no-attribution", timeout=120)
    assert_refused(out, env, expected)


def test_eval_refuses_a_record_longer_than_the_context_before_any_forward_pass(env, tmp_path, world):
    long = tmp_path / "long.jsonl"  # 100 words: under the character limits, over the tiny model's 64 positions
    long.write_text(json.dumps(MCQ) + "\n" + json.dumps({**MCQ, "question": " ".join(["x"] * 100)}) + "\n")
    out = mansu(env, "eval", "--model", world["model"], "--data", str(long))
    assert_refused(out, env, f"error: {long}: record 2: prompt and choice take 104 tokens, longer than the model's "
                             "context of 64 tokens; shorten the record "
                             "(records longer than the context are not scored)")


def test_records_are_checked_against_the_context_from_the_config_alone(world):
    """check_records_fit: the same check without loading weights (for a preflight before a run folder exists)."""
    from transformers import AutoConfig, AutoTokenizer

    from mansu.data.records import load_records
    from mansu.metrics.accuracy import check_records_fit, context_length

    limit = context_length(AutoConfig.from_pretrained(world["model"]))
    tok = AutoTokenizer.from_pretrained(world["model"])
    records = load_records(world["forget"])
    check_records_fit(tok, limit, records, source="forget.jsonl")  # the tiny world fits
    longer = dataclasses.replace(records[3], question=records[3].question + " Zorb Quil")
    check_records_fit(tok, 9, records)  # prompt "[BOS] Where is Zorb from ? Answer :" and one choice token: 9
    with pytest.raises(ValueError, match=r"^forget.jsonl: record 4: prompt and choice take 11 tokens, longer than the "
                                         r"model's context of 9 tokens; shorten the record"):
        check_records_fit(tok, 9, records[:3] + [longer], source="forget.jsonl")


def test_eval_accepts_a_utf8_byte_order_mark(env, tmp_path, world):
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + Path(world["forget"]).read_bytes())
    rows = []
    for path in (world["forget"], str(with_bom)):
        out = mansu(env, "eval", "--model", world["model"], "--data", path, "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert rows[1]["n"] == 4 and {k: v for k, v in rows[1].items() if k != "data"} == {
        k: v for k, v in rows[0].items() if k != "data"}


# ---------------------------------------------------------------- seeds and run ids


@pytest.mark.parametrize("seed, expected", [
    ("-1", "error: seed must be an integer in [0, 4294967295], got -1"),
    (str(10**20), f"error: seed must be an integer in [0, 4294967295], got {10**20}"),
])
def test_run_refuses_seeds_out_of_range(seed, expected, env, world):
    out = mansu(env, "run", "--model", world["model"], "--forget", world["forget"], "--retain", world["retain"],
                f"--seed={seed}", timeout=120)
    assert_refused(out, env, expected)


@pytest.mark.parametrize("seed", ["1.5", "abc"])
def test_run_refuses_seeds_that_are_not_integers(seed, env, world):
    out = mansu(env, "run", "--model", world["model"], "--forget", world["forget"], "--retain", world["retain"],
                f"--seed={seed}", timeout=120)
    assert_refused(out, env, f"error: python -m mansu run: argument --seed: expected an integer, got '{seed}' "
                             "(see --help)")


def test_run_id_with_a_trailing_newline_is_refused(env):
    out = mansu(env, "run", "--from-run", "20260101-000000-ab\n", "--kappa", "2", timeout=120)
    assert_refused(out, env, r"error: invalid run id '20260101-000000-ab\n': expected YYYYMMDD-HHMMSS-slug with "
                             "[a-z0-9_-] only")


# ---------------------------------------------------------------- corrupt run folders


def _corrupt_store(root: Path) -> dict[str, str]:
    """One readable run and one folder per way of being unreadable; run id -> the reason it must be listed with."""
    good = write_sample_run(root, "mansu", 0, 0.3)
    cases = {
        "not-utf8": (layout.STATUS, b'{"state": "finished", "stage": "\xff\xfe"}',
                     "status.json: not UTF-8 text (byte 0xff at offset 32); accepted is UTF-8 encoded JSON"),
        "status-list": (layout.STATUS, b"[1, 2]", "status.json: expected a JSON object, got a JSON array"),
        "status-state": (layout.STATUS, b'{"state": 7}',
                         f"status.json: field 'state' must be one of {', '.join(get_args(RunState))}, got 7"),
        "config-list": (layout.CONFIG, b'["ga"]', "config.json: expected a JSON object, got a JSON array"),
        "config-missing": (layout.CONFIG, None, "config.json: file missing"),
        "bad-json": (layout.METRICS, b'{"base_fp": ',
                     "metrics.json: not valid JSON (Expecting value at line 1 column 13)"),
        "metrics-shape": (layout.METRICS, b'{"base_fp": {"forget": 0.9}}',
                          "metrics.json: base_fp.forget must be a JSON object, got 0.9"),
        "scorecard-shape": (layout.SCORECARD, b'{"properties": [{"name": "retain"}], "all_pass": false}',
                            "scorecard.json: properties must be an object keyed by forgetting, retain, ptq_gap, "
                            "structural_erasure, got [{'name': 'retain'}]"),
        "cad-shape": (layout.CAD, b'{"after_nf4": {"value": "high"}}',
                      "cad.json: after_nf4.value must be a number, got 'high'"),
    }
    reasons = {}
    for slug, (name, data, reason) in cases.items():
        run = create_run({"method": "ga"}, slug, root)
        write_status(run, "done", state="finished")
        if data is None:
            (run / name).unlink()
        else:
            (run / name).write_bytes(data)
        reasons[run.name] = reason
    return {good.name: "", **reasons}


def test_cli_runs_lists_corrupt_folders_with_the_reason_and_every_other_run(env, tmp_path):
    expected = _corrupt_store(tmp_path / "runs")
    out = mansu(env, "runs", "--json", timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    rows = {r["run_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == set(expected)
    for run_id, reason in expected.items():
        if reason:
            shown = {k: rows[run_id][k] for k in ("run_id", "method", "state", "stage", "error")}
            assert shown == {"run_id": run_id, "method": "-", "state": "corrupt", "stage": "unknown", "error": reason}
        else:
            assert rows[run_id]["state"] == "finished" and rows[run_id]["method"] == "mansu"
    text = mansu(env, "runs", timeout=120)
    assert text.returncode == 0 and len(text.stdout.splitlines()) == len(expected)
    assert any(line.startswith(run_id) and "corrupt" in line and line.endswith(f"({reason})")
               for run_id, reason in expected.items() if reason for line in text.stdout.splitlines())


def test_runs_page_lists_corrupt_folders_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(tmp_path))
    monkeypatch.setenv("MANSU_RUNS", str(tmp_path / "runs"))
    expected = _corrupt_store(tmp_path / "runs")
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("views/runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert set(table["run"]) == set(expected)
    by_id = table.set_index("run")
    for run_id, reason in expected.items():
        assert by_id.loc[run_id, "state"] == ("corrupt" if reason else "finished")
        assert by_id.loc[run_id, "error"] == reason
    good = next(run_id for run_id, reason in expected.items() if not reason)
    assert by_id.loc[good, "passed"] == "3/4"
    warning = at.warning[0].value
    assert warning.startswith(f"{len(expected) - 1} run folder(s) cannot be read and are listed as corrupt")
    assert all(f"`{run_id}`: {reason}" in warning for run_id, reason in expected.items() if reason)
    corrupt = next(run_id for run_id, reason in expected.items() if reason)
    at.query_params["run"] = corrupt  # a link to a corrupt run (its picker label can equal another corrupt run's)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[RUN_KEY] == corrupt
    assert f"corrupt: {expected[corrupt]}" in [e.value for e in at.error]


@pytest.mark.parametrize("page", ["views/circuit.py", "views/update_nf4.py", "views/before_after.py",
                                  "views/launch.py", "views/report.py"])
def test_every_page_survives_a_selected_corrupt_run(page, tmp_path, monkeypatch):
    monkeypatch.setenv("MANSU_HOME", str(tmp_path))
    monkeypatch.setenv("MANSU_RUNS", str(tmp_path / "runs"))
    expected = _corrupt_store(tmp_path / "runs")
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page(page).run()
    for run_id in expected:
        at.query_params["run"] = run_id
        at.run()
        assert not at.exception, (run_id, [e.value for e in at.exception])
        assert at.session_state[RUN_KEY] == run_id


# ---------------------------------------------------------------- concurrent creation

_RACER = """
import sys, time
from pathlib import Path
from mansu.runs.store import create_run, device_description, library_versions
device_description(); library_versions()   # import torch before the start line, so the race is on the rename
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
print(create_run({"method": "ga"}, "race", Path(sys.argv[1])).name)
"""


def test_six_processes_creating_runs_in_the_same_second_all_succeed(tmp_path):
    root = tmp_path / "runs"
    start = time.time() + 8  # after every racer has imported torch; they then call create_run together
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(root), str(start)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in results]
    names = [out.strip() for out, _ in results]
    assert len(set(names)) == 6 and sorted(p.name for p in root.iterdir()) == sorted(names)  # no temp folder left
    for name in names:
        assert json.loads((root / name / layout.CONFIG).read_text())["run_id"] == name
