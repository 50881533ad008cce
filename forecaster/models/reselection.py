"""When `auto` selects its model afresh: once a day, at a second of the day of each target's own.

A selection costs several refits' CPU. Under `auto`'s own age rule (`RESELECT` after the last
selection) targets fitted together, at start-up or when a cluster adopts forecaster, all
reselect in the same refit round a day later. Here each target reselects at the first refit
after its own second of the day, set by a hash of its id: targets fitted together spread
over the day's refit rounds. The service (forecaster.target) and the backtest both decide
here, so a replay of a target reselects at the bins the service would.

>>> phase = reselection_phase("shop/web/http_requests")                   # doctest: +SKIP
>>> if reselection_due(model, phase, history.index[-1]): model = None      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib

import pandas as pd

from forecaster.models.selection import RESELECT

RESELECT_SECONDS = int(RESELECT.total_seconds())


def reselection_phase(key: str) -> int:
    """The second of the day (UTC) at which the selection of the target `key` falls due: a
    stable hash (not Python's salted `hash`), so every replica and restart agrees."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % RESELECT_SECONDS


def reselection_due(previous: object, phase: int | None, fit_end: pd.Timestamp) -> bool:
    """Whether a refit on history ending at `fit_end` should select afresh rather than hand
    `previous` (the model it replaces) to the fit: see `passed_since`. `phase` None is the
    time of day of the previous selection: due a day after it, as `auto`'s age rule. False
    for a model that selects nothing (not `auto`)."""
    selection = getattr(previous, "selection_", None)
    if selection is None:
        return False
    then = pd.Timestamp(selection.selected_at).timestamp()
    if phase is None:
        phase = int(then) % RESELECT_SECONDS
    return passed_since(phase, then, fit_end.timestamp())


def passed_since(phase: int, then: float, now: float) -> bool:
    """Whether the second of the day `phase` came in (then, now], epoch seconds."""
    return (now - phase) // RESELECT_SECONDS > (then - phase) // RESELECT_SECONDS
