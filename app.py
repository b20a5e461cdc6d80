"""mansu app: explore circuits, tune the NF4 magnitude floor, compare before and after, launch runs.

Run with `streamlit run app.py` (served on 127.0.0.1 by .streamlit/config.toml).
"""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="mansu", page_icon=":material/explore:", layout="wide")
st.logo(str(Path(__file__).parent / "assets" / "logo.svg"))

RUNS = st.Page("views/runs.py", title="Runs", icon=":material/table_view:", default=True, url_path="home")


def _runs_link() -> None:
    """/runs?run=ID: the Runs page lives at / (the default page has no path of its own), so the link goes there
    with its query (a deep link opens on every page)."""
    st.switch_page(RUNS, query_params=st.query_params.to_dict())


PAGES = [
    RUNS,
    st.Page("views/circuit.py", title="Circuit", icon=":material/hub:", url_path="circuit"),
    st.Page("views/update_nf4.py", title="Update vs NF4", icon=":material/straighten:", url_path="update_nf4"),
    st.Page("views/before_after.py", title="Before / after", icon=":material/compare:", url_path="before_after"),
    st.Page("views/launch.py", title="Launch", icon=":material/rocket_launch:", url_path="launch"),
    st.Page("views/report.py", title="Report", icon=":material/description:", url_path="report"),
    st.Page("views/science.py", title="Science", icon=":material/science:", url_path="science"),
]

# The views live in views/, not pages/: Streamlit treats a pages/ folder as the legacy multipage app until
# the entry script has run once, so a deep link to /runs on a fresh server would bypass this frame.
# every page draws the shared sidebar run picker itself (ui.state.sidebar), so it is always fresh
nav = st.navigation([*PAGES, st.Page(_runs_link, title="Runs", url_path="runs", visibility="hidden")])
nav.run()
