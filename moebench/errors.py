"""User-facing errors.

Anything raised as a `MoebenchError` is a mistake in what the user asked for (a bad name, value,
file): the CLI prints its message as one line and exits non-zero, without a traceback. Any other
exception is a bug in moebench and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoebenchError(Exception):
    """A problem with the user's input, reported as one sentence."""

    exit_code = 2


class ConfigError(MoebenchError):
    """A config key, value or file that cannot be used."""


class DataError(MoebenchError):
    """A data folder or file that is missing or malformed."""


class ModelError(MoebenchError):
    """A model that cannot be found or loaded."""


class NotFoundError(MoebenchError):
    """A name that no registry or store knows."""


class StoreError(MoebenchError):
    """A results database that cannot be opened, created or written (moebench.store.db)."""


class TrainingDiverged(MoebenchError):
    """The loss became NaN or infinite; the run is marked failed with the step and batch."""

    exit_code = 3


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' when a close choice exists, else ''."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> NotFoundError:
    """Build the standard 'unknown X' error listing what is accepted."""
    choices = sorted(choices)
    return NotFoundError(
        f"Unknown {kind} '{value}'; expected one of: {', '.join(choices)}."
        + did_you_mean(value, choices)
    )
