"""The shared polling loop: what it returns, how it fails, and what it reports while waiting."""

from __future__ import annotations

import itertools

import pytest

from tests.support.waiting import poll, wait_for, wait_for_call


def test_poll_returns_the_first_truthy_result() -> None:
    counter = itertools.count()
    assert poll(lambda: next(counter) >= 3 and "done", timeout=5, every=0.001) == "done"


def test_poll_returns_the_last_result_after_the_timeout() -> None:
    assert poll(lambda: 0, timeout=0.02, every=0.001) == 0


def test_poll_reports_progress_while_waiting() -> None:
    reports: list[float] = []
    poll(lambda: None, timeout=0.05, every=0.001, progress=reports.append, progress_every=0.01)
    assert reports
    assert reports == sorted(reports)


def test_wait_for_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"the answer: not within 0.02s \(last: \[\]\)"):
        wait_for(list, timeout=0.02, what="the answer", every=0.001)


def test_wait_for_call_retries_accepted_errors_until_the_call_succeeds() -> None:
    attempts = itertools.count()

    def call() -> int:
        attempt = next(attempts)
        if attempt < 2:
            raise ConnectionError("not yet")
        return attempt

    assert wait_for_call(call, timeout=5, retry=lambda e: isinstance(e, ConnectionError),
                         every=0.001) == 2


def test_wait_for_call_raises_other_errors_at_once() -> None:
    attempts = itertools.count()

    def call() -> int:
        next(attempts)
        raise ValueError("wrong")

    with pytest.raises(ValueError, match="wrong"):
        wait_for_call(call, timeout=5, retry=lambda e: isinstance(e, ConnectionError))
    assert next(attempts) == 1


def test_wait_for_call_gives_the_last_error_after_the_timeout() -> None:
    def call() -> int:
        raise ConnectionError("refused")

    with pytest.raises(AssertionError, match=r"the server: still failing after .*refused") as info:
        wait_for_call(call, timeout=0.02, retry=lambda e: isinstance(e, ConnectionError),
                      what="the server", every=0.001)
    assert isinstance(info.value.__cause__, ConnectionError)
