"""The front's board on its own event loop: triggers resolved once and shared, failures not
cached, answers and forgetting as the engine's process sends them, reports back to it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from forecaster.scaler.board import REPORT_SECONDS, Board
from forecaster.scaler.messages import (
    FORGET,
    REPORT,
    RESOLVE,
    RESOLVED,
    Answer,
    FailedCall,
    Failure,
    Trigger,
)

META = {"serverAddress": "http://prometheus:9090", "query": "sum(rate(x[1m]))",
        "targetValue": "10"}
TRIGGER = Trigger("shop/web/fc-0", "fc-0", 10.0)
ANSWER = Answer(True, 3.5, True)


class Engine:
    """The engine's side of the pipe, as the board sees it: what was sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.reported = asyncio.Event()

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)
        if message[0] == REPORT:
            self.reported.set()

    async def next_report(self) -> None:
        """Until the board sends its next report (every REPORT_SECONDS)."""
        self.reported.clear()
        await asyncio.wait_for(self.reported.wait(), 10 * REPORT_SECONDS)

    def of(self, tag: str) -> list[tuple[Any, ...]]:
        return [m for m in self.sent if m[0] == tag]


async def _primed(engine: Engine, **board_options: float) -> Board:
    """A board that has resolved META to TRIGGER, with ANSWER as its answer."""
    board = Board(engine.send, **board_options)  # type: ignore[arg-type]
    board.bind(asyncio.get_running_loop())
    pending = asyncio.ensure_future(board.trigger("shop", "web", META))
    await asyncio.sleep(0)
    board.receive((RESOLVED, engine.of(RESOLVE)[-1][1], TRIGGER, ANSWER))
    assert await pending == TRIGGER
    return board


def test_calls_with_one_trigger_share_one_round_trip_then_the_cache() -> None:
    async def scenario() -> None:
        engine = Engine()
        board = Board(engine.send)
        board.bind(asyncio.get_running_loop())
        calls = [asyncio.ensure_future(board.trigger("shop", "web", META)) for _ in range(5)]
        await asyncio.sleep(0)
        (request,) = engine.of(RESOLVE)
        assert request[2:] == ("shop", "web", META)
        board.receive((RESOLVED, request[1], TRIGGER, ANSWER))
        assert await asyncio.gather(*calls) == [TRIGGER] * 5
        assert board.answer(TRIGGER.target_id) == ANSWER
        assert await board.trigger("shop", "web", dict(META)) == TRIGGER
        assert len(engine.of(RESOLVE)) == 1
        # another namespace, or other metadata, is another trigger
        other = asyncio.ensure_future(board.trigger("shop", "api", META))
        await asyncio.sleep(0)
        assert len(engine.of(RESOLVE)) == 2
        other.cancel()

    asyncio.run(scenario())


def test_a_failure_reaches_the_caller_and_is_not_cached() -> None:
    async def scenario() -> None:
        engine = Engine()
        board = Board(engine.send)
        board.bind(asyncio.get_running_loop())
        bad = Failure("INVALID_ARGUMENT", "targetValue: must be a positive number, got '-1'")
        for attempt in (1, 2):
            call = asyncio.ensure_future(board.trigger("shop", "web", META))
            await asyncio.sleep(0)
            assert len(engine.of(RESOLVE)) == attempt  # asked again: not cached
            board.receive((RESOLVED, engine.of(RESOLVE)[-1][1], bad, None))
            with pytest.raises(FailedCall) as caught:
                await call
            assert caught.value.failure == bad

    asyncio.run(scenario())


def test_an_engine_that_does_not_answer_gives_unavailable_and_a_later_call_asks_again() -> None:
    async def scenario() -> None:
        engine = Engine()
        board = Board(engine.send, resolve_timeout_seconds=0.05)
        board.bind(asyncio.get_running_loop())
        with pytest.raises(FailedCall) as caught:
            await board.trigger("shop", "web", META)
        assert caught.value.failure.code == "UNAVAILABLE"
        assert "did not answer within" in caught.value.failure.message
        late = asyncio.ensure_future(board.trigger("shop", "web", META))
        await asyncio.sleep(0)
        assert len(engine.of(RESOLVE)) == 2
        board.receive((RESOLVED, engine.of(RESOLVE)[0][1], TRIGGER, ANSWER))  # the first, late
        board.receive((RESOLVED, engine.of(RESOLVE)[1][1], TRIGGER, ANSWER))
        assert await late == TRIGGER

    asyncio.run(scenario())


def test_forgetting_a_target_drops_its_trigger_and_answer_and_wakes_its_waiters() -> None:
    async def scenario() -> None:
        engine = Engine()
        board = await _primed(engine)
        waiting = board.changed(TRIGGER.target_id)
        board.receive((FORGET, (TRIGGER.target_id,)))
        assert waiting.done()
        assert board.answer(TRIGGER.target_id) is None
        again = asyncio.ensure_future(board.trigger("shop", "web", META))
        await asyncio.sleep(0)
        assert len(engine.of(RESOLVE)) == 2  # resolved anew: the engine registers it again
        again.cancel()

    asyncio.run(scenario())


def test_reports_name_the_asked_about_targets_and_count_the_calls() -> None:
    async def scenario() -> None:
        engine = Engine()
        board = await _primed(engine)
        await engine.next_report()
        heartbeats = engine.of(REPORT)
        assert heartbeats  # sent empty too: the engine's sign that the front's loop turns
        assert all(r[1:] == ((), {}, {}) for r in heartbeats)  # resolving registered it
        await board.trigger("shop", "web", META)
        await board.trigger("shop", "web", META)
        board.count("GetMetrics", "OK")
        board.count("GetMetrics", "OK")
        board.count("IsActive", "UNAVAILABLE")
        board.count("IsActive", "UNAVAILABLE")
        board.count_unexpected("IsActive")
        await engine.next_report()
        (report,) = [r for r in engine.of(REPORT)[len(heartbeats):] if r[1] or r[2]]
        assert report[1] == (TRIGGER.target_id,)
        assert report[2] == {("GetMetrics", "OK"): 2, ("IsActive", "UNAVAILABLE"): 2}
        assert report[3] == {"IsActive": 1}  # of those, ended by an unexpected error

    asyncio.run(scenario())


def test_a_closed_board_fails_pending_and_later_resolutions_at_once() -> None:
    async def scenario() -> None:
        engine = Engine()
        board = Board(engine.send)
        board.bind(asyncio.get_running_loop())
        pending = asyncio.ensure_future(board.trigger("shop", "web", META))
        await asyncio.sleep(0)
        board.close()
        for call in (pending, board.trigger("shop", "api", META)):
            with pytest.raises(FailedCall) as caught:
                await call
            assert caught.value.failure.code == "UNAVAILABLE"
        assert len(engine.of(RESOLVE)) == 1

    asyncio.run(scenario())


def test_a_broken_pipe_to_the_engine_is_unavailable() -> None:
    def broken(message: tuple[Any, ...]) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    async def scenario() -> None:
        board = Board(broken)
        board.bind(asyncio.get_running_loop())
        with pytest.raises(FailedCall) as caught:
            await board.trigger("shop", "web", META)
        assert caught.value.failure == Failure("UNAVAILABLE", "the forecaster engine has stopped")

    asyncio.run(scenario())
