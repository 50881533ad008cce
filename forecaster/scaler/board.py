"""The front process's view of the targets: resolved triggers and each target's latest answer.

Everything here runs on the gRPC server's event loop, so it needs no locks: messages from the
engine's process are handed to the loop by the front's reader thread (`receive`), and the
servicer's calls run on it. A trigger is resolved once by the engine's process (which parses
and validates the metadata and registers the target), then cached: KEDA repeats it verbatim
on every poll. Answers are pushed by the engine's process whenever they change.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from forecaster.scaler.messages import (
    ANSWERS,
    FORGET,
    REPORT,
    RESOLVE,
    RESOLVED,
    Answer,
    FailedCall,
    Failure,
    Trigger,
)

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_SECONDS = 10.0
REPORT_SECONDS = 0.5  # how often asked-about targets and call counts go to the engine
# (an empty report too: from the event loop, it is the engine's sign that the loop turns)
TRIGGER_CACHE_SIZE = 20_000

TriggerKey = Hashable  # a ref's (namespace, name, metadata), or its serialization
Resolution = tuple[Trigger | Failure, Answer | None]


class Board:
    """Triggers and answers for the servicer; `send` writes a message to the engine's process.

    >>> board = Board(connection.send)                          # doctest: +SKIP
    >>> trigger = await board.trigger("shop", "web", metadata)  # doctest: +SKIP
    >>> board.answer(trigger.target_id)                         # doctest: +SKIP
    """

    def __init__(
        self,
        send: Callable[[tuple[Any, ...]], None],
        *,
        resolve_timeout_seconds: float = RESOLVE_TIMEOUT_SECONDS,
    ) -> None:
        self._send = send
        self._resolve_timeout = resolve_timeout_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._triggers: dict[TriggerKey, Trigger] = {}
        self._answers: dict[str, Answer] = {}
        self._resolving: dict[TriggerKey, asyncio.Future[Resolution]] = {}
        self._requests: dict[int, TriggerKey] = {}
        self._next_request = 0
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._touched: set[str] = set()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._unexpected: Counter[str] = Counter()
        self._closed = False
        self._heard = 0.0  # loop time of the engine's last message

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the loop before it serves: starts the periodic report."""
        self._loop = loop
        self._heard = loop.time()
        loop.call_later(REPORT_SECONDS, self._report)

    # -- what the servicer uses --------------------------------------------------------------

    async def trigger(
        self,
        namespace: str,
        name: str,
        metadata: Mapping[str, str],
        *,
        key: Hashable | None = None,
        timeout: float | None = None,
    ) -> Trigger:
        """The trigger for this ref; FailedCall with the engine's reason when it is invalid.
        A resolution waits at most `timeout` seconds (the call's deadline), less by default.
        `key` identifies the ref in the cache (see `known`); by default, its fields."""
        if key is None:
            key = (namespace, name, frozenset(metadata.items()))
        trigger = self.known(key)
        if trigger is None:  # resolving registers the target, or marks it as asked about
            limit = self._resolve_timeout
            if timeout is not None:
                limit = max(0.0, min(timeout, limit))
            return await self._resolve(key, namespace, name, metadata, limit)
        return trigger

    def known(self, key: Hashable) -> Trigger | None:
        """The trigger already resolved for `key`, marked as asked about; None if there is
        none. Without a coroutine, for the servicer's calls about a known target: `key` is
        whatever `trigger` was given for the same ref (the servicer gives the ref's
        deterministic serialization, which costs less than a frozenset of its metadata)."""
        trigger = self._triggers.get(key)
        if trigger is not None:
            self._touched.add(trigger.target_id)
        return trigger

    def answer(self, target_id: str) -> Answer | None:
        """The target's latest answer; None when it was forgotten (dropped or replaced)."""
        return self._answers.get(target_id)

    def silent_for(self) -> float:
        """Seconds since the engine's process last sent anything (it does every second)."""
        assert self._loop is not None
        return self._loop.time() - self._heard

    def changed(self, target_id: str) -> asyncio.Future[None]:
        """A future done when the target's next answer arrives (or it is forgotten)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(target_id, []).append(future)
        return future

    def count(self, method: str, code: str) -> None:
        """One finished call, reported to the engine's process (for its /metrics)."""
        self._counts[method, code] += 1

    def count_unexpected(self, method: str) -> None:
        """One of the finished calls ended by an unexpected error (a bug), reported apart so
        that /metrics tells a bug from an outage (both answer UNAVAILABLE)."""
        self._unexpected[method] += 1

    # -- resolving -----------------------------------------------------------------------------

    async def _resolve(
        self,
        key: TriggerKey,
        namespace: str,
        name: str,
        metadata: Mapping[str, str],
        timeout: float,
    ) -> Trigger:
        future = self._resolving.get(key)
        if future is None:  # calls with the same trigger at once share one round trip
            if self._closed:
                raise FailedCall(Failure("UNAVAILABLE", "the forecaster engine has stopped"))
            future = asyncio.get_running_loop().create_future()
            self._resolving[key] = future
            self._next_request += 1
            self._requests[self._next_request] = key
            try:
                self._send((RESOLVE, self._next_request, namespace, name, dict(metadata)))
            except OSError:
                self.close()
                raise FailedCall(
                    Failure("UNAVAILABLE", "the forecaster engine has stopped")
                ) from None
        try:
            result, _ = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if timeout >= self._resolve_timeout and self._resolving.get(key) is future:
                # The engine is stuck: the next call asks again. A call whose own deadline
                # came first leaves the request in flight for the calls after it.
                del self._resolving[key]
                for request_id in [r for r, k in self._requests.items() if k == key]:
                    del self._requests[request_id]
            raise FailedCall(Failure(
                "UNAVAILABLE",
                f"the forecaster engine did not answer within {timeout:.1f}s",
            )) from None
        if isinstance(result, Failure):
            raise FailedCall(result)
        return result

    def _resolved(self, request_id: int, result: Trigger | Failure, answer: Answer | None) -> None:
        key = self._requests.pop(request_id, None)
        if key is None:
            return
        if isinstance(result, Trigger):
            self._triggers[key] = result
            if len(self._triggers) > TRIGGER_CACHE_SIZE:
                del self._triggers[next(iter(self._triggers))]  # the oldest
            if answer is not None:
                self._set_answer(result.target_id, answer)
        future = self._resolving.pop(key, None)
        if future is not None and not future.done():
            future.set_result((result, answer))

    # -- messages from the engine's process (on the loop) --------------------------------------

    def receive(self, message: tuple[Any, ...]) -> None:
        """One message from the engine's process, handed to the loop by the front's reader."""
        if self._loop is not None:
            self._heard = self._loop.time()
        tag = message[0]
        if tag == RESOLVED:
            self._resolved(message[1], message[2], message[3])
        elif tag == ANSWERS:
            for target_id, answer in message[1].items():
                self._set_answer(target_id, answer)
        elif tag == FORGET:
            self._forget(set(message[1]))
        else:
            log.error("unexpected message %r from the engine's process", tag)

    def close(self) -> None:
        """The engine's process is gone: pending and later resolutions fail at once."""
        self._closed = True
        gone = Failure("UNAVAILABLE", "the forecaster engine has stopped")
        for future in self._resolving.values():
            if not future.done():
                future.set_result((gone, None))
        self._resolving.clear()
        self._requests.clear()

    def _set_answer(self, target_id: str, answer: Answer) -> None:
        self._answers[target_id] = answer
        self._wake(target_id)

    def _wake(self, target_id: str) -> None:
        for future in self._waiters.pop(target_id, ()):
            if not future.done():
                future.set_result(None)

    def _forget(self, target_ids: set[str]) -> None:
        """Dropped (idle) or replaced targets: their next call resolves the trigger again."""
        for key in [k for k, t in self._triggers.items() if t.target_id in target_ids]:
            del self._triggers[key]
        for target_id in target_ids:
            self._answers.pop(target_id, None)
            self._touched.discard(target_id)
            self._wake(target_id)

    def _report(self) -> None:
        """Tell the engine which targets were asked about (so they stay) and the call counts;
        sent empty too, as the heartbeat by which the engine's process sees the loop turn."""
        assert self._loop is not None
        if not self._closed:
            touched, counts = tuple(self._touched), dict(self._counts)
            unexpected = dict(self._unexpected)
            self._touched.clear()
            self._counts.clear()
            self._unexpected.clear()
            try:
                self._send((REPORT, touched, counts, unexpected))
            except OSError:  # the engine's process is gone; the front is about to stop
                self._closed = True
        self._loop.call_later(REPORT_SECONDS, self._report)
