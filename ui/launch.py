"""Starting backend processes from the app and showing their live progress.

Processes are started with `mansu.appstate.start_backend` (a separate process, never inside a
rerun) and remembered in session_state; a fragment polls status.json once a second.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import streamlit as st

from mansu.appstate import (Launched, LaunchSpec, backend_error, build_command, cancel_run, find_run_for_pid,
                            log_tail, progress_of, start_backend, validate_spec)
from mansu.paths import runs_root
from mansu.runs.store import read_status, run_dir
from mansu.unlearn.demo_settings import demo_settings
from ui.state import request_selection

LAUNCHES = "_launches"


def launches() -> list[dict[str, Any]]:
    return st.session_state.setdefault(LAUNCHES, [])


def launch(command: list[str], label: str, then: list[tuple[list[str], str]] | None = None) -> Launched:
    """Start a backend command and remember it for the progress panel; `then` are (command, label) pairs
    started one after another when this one finishes successfully (one process at a time on a laptop)."""
    proc, info = start_backend(command, label=label)
    launches().insert(0, {"proc": proc, "info": info, "label": label, "run_id": None, "cancelled": False,
                          "then": list(then or [])})
    return info


def launch_spec(spec: LaunchSpec) -> Launched:
    """Validate a form's spec (raises ValueError / FileNotFoundError) and launch it."""
    validate_spec(spec)
    return launch(build_command(spec), label=spec.method)


def demo_commands() -> list[tuple[list[str], str]]:
    """The demo comparison: GradDiff then MANSU on the NF4-grid-aligned demo base (where SPEC.md measured the
    dual failure of gradient methods and the floor's fix), with the settings of docs/results.md; the first run
    also builds the demo if missing."""
    return [(build_command(LaunchSpec(method=m, demo=True, base_alignment="nf4-grid", hparams=demo_settings(m))),
             f"demo: {m}") for m in ("graddiff", "mansu")]


def launch_demo() -> Launched:
    (first, label), *rest = demo_commands()
    return launch(first, label, then=rest)


def _entry_status(entry: dict[str, Any]) -> dict[str, Any] | None:
    if entry["run_id"] is None:
        entry["run_id"] = find_run_for_pid(entry["info"].pid, runs_root())
        if entry["run_id"] is not None:
            st.session_state["_new_run"] = True  # the run list changed: refresh the whole page once
    if entry["run_id"] is None:
        return None
    try:
        return read_status(run_dir(entry["run_id"], runs_root()))
    except FileNotFoundError:
        return None


def _show_entry(entry: dict[str, Any], i: int) -> bool:
    """One launch's progress; returns True while it still runs."""
    proc, info = entry["proc"], entry["info"]
    code = proc.poll()
    status = _entry_status(entry)
    title = f"**{entry['label']}** · pid {info.pid}" + (f" · run `{entry['run_id']}`" if entry["run_id"] else "")
    st.markdown(title)
    if status is not None:
        # the ETA extrapolates the current stage from when this panel first saw it (status.json's started_at
        # is the run's start, and step/total restart with every stage)
        stage_key = (status.get("stage"), status.get("total"))
        if entry.get("stage_key") != stage_key:
            entry["stage_key"], entry["stage_seen"] = stage_key, dt.datetime.now(dt.timezone.utc).isoformat()
        prog = progress_of({**status, "stage_started_at": status.get("stage_started_at") or entry["stage_seen"]})
        st.progress(prog.fraction, text=prog.text)
    elif code is None:
        st.progress(0.0, text="starting (building the demo world and model when missing, about a minute)…")
    tail = log_tail(info.log_path, 6)
    if code is None:
        if tail:
            st.code(tail, language=None)
        if entry["then"]:
            st.caption("next: " + ", ".join(label for _, label in entry["then"]))
        if st.button("Cancel", key=f"cancel-{info.pid}-{i}"):
            cancel_run(info.pid, entry["run_id"], runs_root())
            entry["cancelled"], entry["then"] = True, []
            st.rerun()
        return True
    if entry["cancelled"]:
        st.warning("cancelled")
    elif code == 0 and entry["then"]:
        (command, label), *rest = entry["then"]
        entry["then"] = []
        st.success("finished; starting the next run")
        launch(command, label, then=rest)
        launches()[0]["previous_run"] = entry["run_id"]
        return True
    elif code == 0 and entry.get("previous_run") and entry["run_id"]:
        # the end of a chain (the demo comparison): open its last run, compared with the one before
        if not entry.get("selected"):
            entry["selected"] = True
            request_selection(entry["run_id"], entry["previous_run"])
        st.success(f"finished: `{entry['run_id']}` is selected, compared with `{entry['previous_run']}`; "
                   "open Before / after or Report")
    elif code == 0:
        st.success("finished" + (f": select `{entry['run_id']}` in the sidebar" if entry["run_id"] else ""))
    else:
        message = backend_error(log_tail(info.log_path, 200)) or f"exit status {code}"
        st.error(f"backend error: {message}")
        with st.expander("backend log"):
            st.code(log_tail(info.log_path, 40), language=None)
    return False


def progress_panel() -> None:
    """Live progress of every backend started in this session (polls status.json each second)."""
    if launches():
        _panel()


@st.fragment(run_every=1.0)
def _panel() -> None:
    items = launches()
    st.subheader("Backend runs")
    running = [_show_entry(entry, i) for i, entry in enumerate(list(items))]  # a chained run may be added
    finished_now = not any(running) and st.session_state.get("_had_running")
    st.session_state["_had_running"] = any(running)
    if finished_now or st.session_state.pop("_new_run", False):
        st.rerun(scope="app")  # a run appeared or finished: refresh the sidebar and the page
