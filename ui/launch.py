"""Starting backend runs from the app and showing live progress of every active run.

Work starts only through `mansu.launch.launch_runs` (validated RunSpecs, one backend process per launch, a
queue for several runs).  The progress panel reads the run store, not this tab's memory: every tab shows every
queued or running run and can cancel it, and a chain survives a closed tab.  Launches of this session are kept
only to show what happened before a run folder existed (demo build, a backend error at start) and to select the
finished demo comparison.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from mansu.launch import (
    Launched,
    active_runs,
    backend_error,
    cancel_run,
    launch_runs,
    log_tail,
    progress_of,
    runs_of_pid,
)
from mansu.models.demo import demo_build_progress
from mansu.paths import runs_root
from mansu.runs.store import RunSummary
from mansu.spec import RunSpec, demo_spec
from ui.state import request_selection

LAUNCHES = "_launches"
DEMO_METHODS = ("graddiff", "mansu")  # the demo comparison: a gradient baseline, then MANSU (docs/results.md)


def launches() -> list[dict[str, Any]]:
    return st.session_state.setdefault(LAUNCHES, [])


def launch(specs: list[RunSpec], label: str, *, select_last: bool = False) -> Launched:
    """Validate and start `specs` as one backend process; remember the launch for the progress panel."""
    proc, info = launch_runs(specs, label)
    launches().insert(0, {"proc": proc, "info": info, "label": label, "n_runs": len(specs),
                          "select_last": select_last, "done": False})
    return info


def demo_specs() -> list[RunSpec]:
    """GradDiff then MANSU on the demo world with the settings of docs/results.md (the backend builds the demo
    world and model first when missing)."""
    return [demo_spec(m) for m in DEMO_METHODS]


def launch_demo() -> Launched:
    return launch(demo_specs(), "demo comparison", select_last=True)


def _show_active(run: RunSummary) -> None:
    prog = progress_of(run.status)
    st.markdown(f"**{run.run_id}**")
    st.progress(prog.fraction, text=prog.text)
    if st.button("Cancel", key=f"cancel-{run.run_id}"):
        cancel_run(run.run_id, runs_root())
        st.rerun()


def _show_starting(entry: dict[str, Any]) -> None:
    """A launch of this tab whose first run folder does not exist yet: the demo build's progress, if any."""
    st.markdown(f"**{entry['label']}** · pid {entry['info'].pid}")
    build = demo_build_progress()
    if build and build.get("state") != "done":
        fraction = build.get("fraction") or 0.0
        eta = build.get("eta_s")
        text = f"building the demo: {build.get('stage', '?')}" + (f" · ETA {eta:.0f} s" if eta is not None else "")
        st.progress(min(1.0, max(0.0, float(fraction))), text=text)
    else:
        st.progress(0.0, text="starting…")
    tail = log_tail(entry["info"].log_path, 4)
    if tail:
        st.code(tail, language=None)


def _show_ended(entry: dict[str, Any], runs: list[RunSummary], code: int) -> None:
    """What a finished launch of this tab did: its error, or the runs it made (the demo comparison selected)."""
    states = ", ".join(f"`{r.run_id}` {r.status.get('state')}" for r in runs)
    if code != 0:
        failed = [r.status["error"] for r in runs if r.status.get("state") == "failed" and r.status.get("error")]
        message = backend_error(log_tail(entry["info"].log_path, 200)) or (failed or [f"exit status {code}"])[0]
        st.error(f"backend error ({entry['label']}): {message}" + (f" · runs: {states}" if runs else ""))
        with st.expander("backend log"):
            st.code(log_tail(entry["info"].log_path, 40), language=None)
        return
    if entry["select_last"] and len(runs) >= 2 and not entry.get("selected"):
        entry["selected"] = True
        request_selection(runs[-1].run_id, runs[-2].run_id)
        st.rerun(scope="app")  # the pickers take a pending selection only on a full rerun
    if entry["select_last"] and len(runs) >= 2:
        st.success(f"finished: `{runs[-1].run_id}` is selected, compared with `{runs[-2].run_id}`; "
                   "open Before / after or Report")
    else:
        st.success(f"{entry['label']} finished: {states}")


def progress_panel() -> None:
    """Live progress of every active run in the store and of this tab's launches (polls once a second)."""
    if launches() or active_runs(runs_root()):
        _panel()


@st.fragment(run_every=1.0)
def _panel() -> None:
    st.subheader("Backend runs")
    active = sorted(active_runs(runs_root()), key=lambda r: r.status.get("state") != "running")  # running first
    for run in active:
        _show_active(run)
    shown = {r.run_id for r in active}
    for entry in launches():
        code = entry["proc"].poll()
        runs = runs_of_pid(entry["info"].pid, runs_root())
        if code is None and not runs:
            _show_starting(entry)
        elif code is not None and not any(r.run_id in shown for r in runs):
            _show_ended(entry, runs, code)
    changed = {r.run_id for r in active} != st.session_state.get("_active_ids", set())
    st.session_state["_active_ids"] = {r.run_id for r in active}
    if changed:
        st.rerun(scope="app")  # a run appeared or finished: refresh the sidebar and the page
