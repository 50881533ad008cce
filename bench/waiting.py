"""The bench scripts' one polling loop: they run as scripts, apart from the tests' helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    *,
    every: float = 0.2,
    progress: Callable[[float], object] | None = None,
    progress_every: float = 10.0,
) -> T | None:
    """predicate()'s first truthy result, or None after `timeout` s; while waiting,
    `progress(seconds so far)` every `progress_every` s."""
    began = time.monotonic()
    reported = began
    while True:
        result = predicate()
        if result:
            return result
        now = time.monotonic()
        if now - began > timeout:
            return None
        if progress is not None and now - reported >= progress_every:
            reported = now
            progress(now - began)
        time.sleep(every)
