"""The moebench leaderboard: entry page. Start it with `moebench leaderboard [--db URL]`.

Only navigation lives here; each page renders numbers computed by `moebench.board`.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="moebench leaderboard", layout="wide")
pages = [
    st.Page("pages/leaderboard.py", title="Leaderboard", default=True),
    st.Page("pages/run.py", title="Run"),
    st.Page("pages/jobs.py", title="Jobs"),
]
st.navigation(pages).run()
