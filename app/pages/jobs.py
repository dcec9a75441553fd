"""Jobs: queued, running with progress, done, failed with reasons; refreshes while running."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from board_support import store_or_stop

from moebench.board.runs import jobs_by_status
from moebench.store.jobs import list_jobs

REFRESH_S = 5

store = store_or_stop()
st.title("Jobs")
# Poll only while something is queued or running (a sweep is under way).
active = any(jobs_by_status(store)[s] for s in ("queued", "running"))
if active:
    st.caption(f"Refreshing every {REFRESH_S} s while jobs are queued or running.")


@st.fragment(run_every=REFRESH_S if active else None)
def _jobs() -> None:
    counts = jobs_by_status(store)
    cols = st.columns(len(counts))
    for col, (status, n) in zip(cols, counts.items(), strict=True):
        col.metric(status, n)
    jobs = list_jobs(store)
    if not jobs:
        st.info("No jobs: `moebench sweep FILE` queues some.")
        return
    frame = pd.DataFrame(jobs)
    frame["progress"] = [_progress(p) for p in frame["progress"]]
    keep = ["id", "status", "method", "model", "suite", "seed", "sweep", "progress"]
    keep += ["attempts", "status_reason", "started_at", "finished_at"]
    for status in ("running", "queued", "failed", "done"):
        part = frame[frame["status"] == status]
        if len(part):
            st.subheader(f"{status} ({len(part)})")
            st.dataframe(part[keep], hide_index=True, key=f"jobs_{status}")


def _progress(p: dict | None) -> str:
    if not p:
        return ""
    step, total = p.get("step"), p.get("total")
    where = f"{step}/{total}" if step is not None and total else (str(step) if step else "")
    return " ".join(x for x in (str(p.get("stage", "")), where) if x)


_jobs()
