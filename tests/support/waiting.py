"""Waiting, with a bound, for something another thread or process does: the one polling loop
the tests share, so that every wait fails the same way, with what it waited for.

Prefer an event or an injected clock where the code offers one; poll only what has no event.
Example::

    forecast = wait_for(lambda: target.snapshot.forecast, timeout=60, what="the first forecast")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.05  # short against any timeout here, long enough not to load the 2 cores


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str = "the condition",
             every: float = POLL_SECONDS) -> T:
    """predicate()'s first truthy result; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s (last: {result!r})")
        time.sleep(every)


def wait_for_call(call: Callable[[], T], timeout: float, retry: Callable[[Exception], bool],
                  what: str = "the call", every: float = POLL_SECONDS) -> T:
    """call()'s result once it stops raising errors that `retry` accepts; any other error
    leaves at once, and AssertionError naming `what` and the last error after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Exception as exc:
            if not retry(exc):
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout:g}s: {exc!r}") from exc
        time.sleep(every)
