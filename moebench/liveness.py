"""Keeping a claimed job alive in the store, and ending it cleanly on a signal.

A background thread beats the job's heartbeat (and its running wall time, so even a process
killed with SIGKILL leaves its time counted) every few seconds. If the beat finds the job is no
longer this process's (a user cancelled it, or another worker took it over as dead), `lost` is
set and the loop stops at its next step. SIGTERM is turned into KeyboardInterrupt while a job
runs, so a scheduler's kill ends the job like Ctrl-C: recorded as interrupted, checkpoint kept.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from moebench.errors import MoebenchError
from moebench.store import Store
from moebench.store import jobs as q

log = logging.getLogger(__name__)


class JobLost(MoebenchError):
    """This process no longer owns its job (cancelled, or taken over); it stops, writing nothing."""

    exit_code = 4


class Heartbeat:
    """Beats `run_id`'s heartbeat as `owner` from a daemon thread while the job runs."""

    def __init__(
        self,
        store: Store,
        run_id: int,
        owner: str,
        earlier_wall_s: float,
        every_s: float = q.HEARTBEAT_EVERY_S,
    ) -> None:
        self.store, self.run_id, self.owner = store, run_id, owner
        self.earlier_wall_s = earlier_wall_s
        self.every_s = every_s
        self.started = time.perf_counter()
        self.lost = threading.Event()
        # What the job is doing (stage, step, loss), written with the next beat.
        self.progress: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def wall_s(self) -> float:
        """Wall time of every process of this run so far, this one included."""
        return self.earlier_wall_s + time.perf_counter() - self.started

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                alive = q.heartbeat(
                    self.store,
                    self.run_id,
                    self.owner,
                    wall_time_s=self.wall_s(),
                    progress=dict(self.progress),
                )
                if not alive:
                    self.lost.set()
                    return
            except Exception:  # a store hiccup: the next beat tries again
                log.warning("heartbeat of run %d failed; retrying", self.run_id, exc_info=True)

    def check(self) -> None:
        """Raise JobLost if the job stopped being ours; called by the loop at each step."""
        if self.lost.is_set():
            raise JobLost(
                f"Run {self.run_id} is no longer held by this process (cancelled, or taken over "
                "by another worker); stopping without writing."
            )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (main thread only): recording how a job ended
    must not be cut short by the second signal of a Ctrl-C that a pool passes on as SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
