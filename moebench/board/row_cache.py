"""Main-table rows kept between builds in one process, keyed on the runs they were made from.

A leaderboard server rebuilds the table whenever the store changes, and under a sweep it
changes with every finished job; nearly all rows are then as they were. A row (its scores,
parameter counts and per-item verdicts, before the paired tests that depend on the other rows)
is a function of its runs' rows and results under the protocol filter, and every write of those
goes through the store's API, which touches the run's `updated_at` (a data migration that
rewrites results must touch it too). So each member's (id, `updated_at`) is the row's stamp:
equal stamps, equal rows; a rescored, re-predicted or updated run gives a new stamp. Stamps are
compared for equality only, so a writer whose clock lags still makes a new one.

One entry per seed group (store, protocol filter, group key): a new stamp replaces the old
row. Bounded by the verdicts held (the memory that matters), least recently used out first;
thread-safe, as Streamlit serves each browser session on its own thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moebench.board.table import BoardRow

MAX_VERDICTS = 1_000_000  # about 310 bytes each (item id, prompt hash, gold): ~300 MB at most


class RowCache:
    """A bounded least-recently-used map from a seed group to its row and the row's stamp."""

    def __init__(self, max_verdicts: int = MAX_VERDICTS) -> None:
        self.max_verdicts = max_verdicts
        self._rows: OrderedDict[Hashable, tuple[Hashable, BoardRow, int]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, group: Hashable, stamp: Hashable) -> BoardRow | None:
        """A fresh copy of the group's row (its per-build fields reset), if built from `stamp`."""
        with self._lock:
            found = self._rows.get(group)
            if found is None or found[0] != stamp:
                return None
            self._rows.move_to_end(group)
        return _copy(found[1])

    def put(self, group: Hashable, stamp: Hashable, row: BoardRow) -> None:
        """Keep a copy of `row`, built from `stamp`, before any paired test touched it."""
        size = 1 + sum(len(items) for items in row.verdicts.values())
        with self._lock:
            old = self._rows.pop(group, None)
            if old is not None:
                self._held -= old[2]
            if size > self.max_verdicts:
                return
            self._rows[group] = (stamp, _copy(row), size)
            self._held += size
            while self._held > self.max_verdicts:
                _, (_, _, dropped) = self._rows.popitem(last=False)
                self._held -= dropped

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._held = 0

    def __len__(self) -> int:
        return len(self._rows)


def _copy(row: BoardRow) -> BoardRow:
    """The row with the fields a build sets afterwards back at their defaults; its scores and
    verdicts are shared, as nothing changes them once made."""
    return replace(row, in_band=True, vs_lora=None, lora_key=None, rank=None)


ROWS = RowCache()
