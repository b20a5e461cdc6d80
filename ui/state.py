"""Shared app state: the sidebar run picker, cached artifact loaders (keyed on path + mtime) and
"not computed for this run" notices."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from mansu.paths import runs_root
from mansu.runs import layout
from mansu.runs.store import RunSummary, artifact, list_runs
from mansu.spec import run_label
from mansu.viz import artifacts

RUN_KEY = "run_id"
COMPARE_KEY = "compare_id"
NONE = "(none)"


@dataclass(frozen=True)
class Selection:
    run: RunSummary | None
    compare: RunSummary | None
    runs: list[RunSummary]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1.0


def all_runs() -> list[RunSummary]:
    return list_runs(runs_root())


def run_name(run: RunSummary) -> str:
    """The run's label (mansu.spec.run_label) for legends and headings."""
    return run_label(run.run_id, run.config)


def picker_labels(runs: list[RunSummary]) -> dict[str, str]:
    """Each run's label, with its id added where two runs share one: Streamlit maps a picked option back by its
    label, so two equal labels would select the wrong run."""
    names = {r.run_id: run_name(r) for r in runs}
    counts = Counter(names.values())
    return {i: name if counts[name] == 1 else f"{name} ({i})" for i, name in names.items()}


def page_preamble(title: str) -> Selection:
    """Every page starts alike: its title, then the shared sidebar run picker (same widget keys on every page,
    so the choice persists across pages)."""
    st.title(title)
    return sidebar()


URL_RUN = "run"            # ?run=<run id>: a link that opens the app on one run (for sharing with reviewers)
_URL_SEEN = "_url_run"     # the ?run= value last applied or written, so a new link wins and a stale one does not
PENDING = "_select_next"   # (run, compare) chosen by code, applied before the pickers exist on the next rerun


def request_selection(run_id: str, compare_id: str | None = None) -> None:
    """Select a run (and a comparison run) on the next rerun; a widget's state cannot change once it is drawn."""
    st.session_state[PENDING] = (run_id, compare_id)


def _apply_pending(ids: list[str]) -> None:
    run_id, compare_id = st.session_state.pop(PENDING, (None, None))
    if run_id in ids:
        st.session_state[RUN_KEY] = run_id
        if compare_id in ids and compare_id != run_id:
            st.session_state[COMPARE_KEY] = compare_id


def _apply_url_run(ids: list[str]) -> None:
    """Select the run named by ?run= when the link is new (an unknown or invalid id is ignored)."""
    wanted = st.query_params.get(URL_RUN)
    if wanted in ids and wanted != st.session_state.get(_URL_SEEN):
        st.session_state[RUN_KEY] = st.session_state[_URL_SEEN] = wanted


def _write_url_run(run_id: str) -> None:
    if st.query_params.get(URL_RUN) != run_id:
        st.query_params[URL_RUN] = run_id
    st.session_state[_URL_SEEN] = run_id


def sidebar() -> Selection:
    """Run and comparison-run pickers in the sidebar; the choice lives in session_state."""
    runs = all_runs()
    ids = [r.run_id for r in runs]
    by_id = {r.run_id: r for r in runs}
    with st.sidebar:
        st.caption(f"runs folder: `{runs_root()}`")
        if not runs:
            st.info("No runs yet: open **Runs** and build the demo.")
            return Selection(None, None, [])
        _apply_pending(ids)
        _apply_url_run(ids)
        if st.session_state.get(RUN_KEY) not in ids:
            st.session_state[RUN_KEY] = ids[0]
        labels = picker_labels(runs)
        st.selectbox("run", ids, key=RUN_KEY,
                     format_func=lambda i: f"{labels[i]}  [{by_id[i].status.get('state', '?')}]")
        _write_url_run(st.session_state[RUN_KEY])
        compare_options = [NONE, *[i for i in ids if i != st.session_state[RUN_KEY]]]
        if st.session_state.get(COMPARE_KEY) not in compare_options:
            st.session_state[COMPARE_KEY] = NONE
        st.selectbox("compare with", compare_options, key=COMPARE_KEY,
                     format_func=lambda i: i if i == NONE else labels[i])
    compare_id = st.session_state[COMPARE_KEY]
    return Selection(by_id[st.session_state[RUN_KEY]], by_id.get(compare_id), runs)


def require_run(sel: Selection) -> RunSummary | None:
    """The selected run, or an info box pointing to Runs when there is none."""
    run = sel.run
    if run is None:
        st.info("No run selected. Open **Runs** to build and run the demo, or **Launch** to start a run.")
    return run


def not_computed(what: str, run: RunSummary) -> None:
    """The standard notice for a missing artifact."""
    state = run.status.get("state", "?")
    hint = " (the run is still going: this appears when its stage finishes)" if state == "running" else ""
    st.info(f"{what}: not computed for this run ({run.run_id}){hint}.")


@st.cache_data(show_spinner=False, max_entries=64)
def _json_cached(path: str, mtime: float) -> Any:
    return artifacts.read_json_or_none(Path(path))


def load_json(run: RunSummary, name: str) -> Any | None:
    """A JSON artifact (layout file name; a --from-run child's inherited ones from its parent), cached on path +
    mtime."""
    path = artifact(run.path, name)
    return _json_cached(str(path), _mtime(path))


@st.cache_resource(show_spinner=False, max_entries=8)
def _graph_cached(run_path: str, stage: str, mtime: float) -> artifacts.GraphData | None:
    return artifacts.load_graph(Path(run_path), stage)


def load_graph(run: RunSummary, stage: str) -> artifacts.GraphData | None:
    """The attribution graph of a stage, cached (read-only arrays)."""
    return _graph_cached(str(run.path), stage, _mtime(artifact(run.path, layout.attribution_json(run.path, stage))))


@st.cache_resource(show_spinner=False, max_entries=4)
def _update_cached(run_path: str, mtime: float) -> dict[str, Any] | None:
    return artifacts.load_update(Path(run_path))


def load_update(run: RunSummary) -> dict[str, Any] | None:
    """update.safetensors tensors (cached; read-only: never modify them)."""
    return _update_cached(str(run.path), _mtime(Path(run.path) / layout.UPDATE))

