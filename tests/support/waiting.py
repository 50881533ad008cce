"""Waiting, with a bound, for something another thread or process does: the one polling loop
that the tests and the bench scripts share, so that every wait ends the same way.

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


def poll(predicate: Callable[[], T | None], timeout: float, *, every: float = POLL_SECONDS,
         progress: Callable[[float], object] | None = None,
         progress_every: float = 10.0) -> T | None:
    """predicate()'s first truthy result, or its last result after `timeout` s; while waiting,
    `progress(seconds so far)` every `progress_every` s, for waits long enough to report on."""
    began = time.monotonic()
    reported = began
    while True:
        result = predicate()
        if result:
            return result
        now = time.monotonic()
        if now - began > timeout:
            return result
        if progress is not None and now - reported >= progress_every:
            reported = now
            progress(now - began)
        time.sleep(every)


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str = "the condition",
             every: float = POLL_SECONDS) -> T:
    """predicate()'s first truthy result; AssertionError naming `what` after `timeout` s."""
    result = poll(predicate, timeout, every=every)
    if not result:
        raise AssertionError(f"{what}: not within {timeout:g}s (last: {result!r})")
    return result


def wait_for_call(call: Callable[[], T], timeout: float, retry: Callable[[Exception], bool],
                  what: str = "the call", every: float = POLL_SECONDS) -> T:
    """call()'s result once it stops raising errors that `retry` accepts; any other error
    leaves at once, and AssertionError naming `what` and the last error after `timeout` s."""
    failures: list[Exception] = []

    def attempt() -> tuple[T] | None:
        try:
            return (call(),)
        except Exception as exc:
            if not retry(exc):
                raise
            failures[:] = [exc]
            return None

    answer = poll(attempt, timeout, every=every)
    if answer is None:
        last = failures[-1]
        raise AssertionError(f"{what}: still failing after {timeout:g}s: {last!r}") from last
    return answer[0]
