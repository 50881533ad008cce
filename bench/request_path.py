"""The GetMetrics path's pieces timed in this process, without gRPC: where a call's CPU goes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
import pandas as pd

from forecaster.scaler.generated import externalscaler_pb2 as pb
from scaler_fleet import STEP

log = logging.getLogger("bench").info


class NoDeadline:
    """A stand-in context for timing the handler in process: no deadline; an abort raises."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def time_request_path(service: Any, request: bytes) -> dict[str, float]:
    """The GetMetrics path's pieces timed in this process (microseconds per call): the
    front's handler over a Board primed as the engine's process would prime it, and the
    engine's side."""
    from forecaster.scaler.board import Board
    from forecaster.scaler.messages import RESOLVED, Answer, Trigger
    from forecaster.scaler.servicer import ExternalScaler, ref_key

    resolver, engine = service.resolver, service.engine
    message = pb.GetMetricsRequest.FromString(request)
    ref = message.scaledObjectRef
    metadata = dict(ref.scalerMetadata)
    target = resolver.resolve(ref.namespace, ref.name, metadata)
    planned = engine.serve(target.target_id)
    sent: list[tuple[Any, ...]] = []
    board = Board(sent.append)
    servicer = ExternalScaler(board, first_value_wait_seconds=1.0)
    context = NoDeadline()
    loop = asyncio.new_event_loop()

    async def prime() -> None:
        servicer.bind(asyncio.get_running_loop())
        pending = asyncio.ensure_future(servicer.GetMetrics(message, context))
        await asyncio.sleep(0)
        trigger = Trigger(target.target_id, target.spec.effective_metric_name,
                          target.spec.target_value)
        board.receive((RESOLVED, sent[-1][1], trigger, Answer(True, planned.value, True)))
        await pending

    loop.run_until_complete(prime())

    async def handled(times: int) -> pb.GetMetricsResponse:
        for _ in range(times):
            response = await servicer.GetMetrics(message, context)
        return response

    async def active(times: int) -> None:
        for _ in range(times):
            await servicer.IsActive(ref, context)

    parts: dict[str, Callable[[], object]] = {
        "GetMetricsRequest.FromString": lambda: pb.GetMetricsRequest.FromString(request),
        "dict(ref.scalerMetadata)": lambda: dict(ref.scalerMetadata),
        "front: the caches' key (ref_key)": lambda: ref_key(ref),
        "engine: resolver.resolve (dict + cache)": lambda: resolver.resolve(
            ref.namespace, ref.name, dict(ref.scalerMetadata)
        ),
        "engine: engine.serve": lambda: engine.serve(target.target_id),
        "build the response": lambda: pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName="fc-0", metricValue=3,
                                         metricValueFloat=planned.value)]
        ),
        "response.SerializeToString": loop.run_until_complete(handled(1)).SerializeToString,
    }
    timings = {name: time_call(call) for name, call in parts.items()}
    # The async handler, awaited 100 times per loop pass so the loop's cost stays small.
    timings["front: servicer.GetMetrics (handler, awaited)"] = time_call(
        lambda: loop.run_until_complete(handled(100)), batch=2
    ) / 100
    timings["front: servicer.IsActive (handler, awaited)"] = time_call(
        lambda: loop.run_until_complete(active(100)), batch=2
    ) / 100
    loop.close()
    # The background work that shares the GIL with the requests, per target.
    quantiles = sorted({0.05, 0.1, 0.5, 0.9, 0.95, target.spec.quantile})
    horizon = 1 + target.lead_steps
    now = datetime.now(UTC)

    busy = [0]  # calls that found the loop's own refresh of the target in flight

    def refresh() -> None:
        if not engine.run_refresh(target.target_id):
            busy[0] += 1

    background: dict[str, Callable[[], object]] = {
        "background: model.predict (one target)": lambda: target.model.predict(
            horizon, quantiles
        ),
        "background: refresh, no new bin (one target)": refresh,
        "background: query_range 14 d, 5 min (one target)": lambda: target.source.query_range(
            target.spec.query, now - pd.Timedelta(days=14) + pd.Timedelta(minutes=5), now,
            STEP,
        ),
        "background: buffer.series() for a fit (one target)": target.buffer.series,
    }
    for name, call in background.items():
        try:
            timings[name] = time_call(call, batch=5)
        except AttributeError as exc:  # a target with no model yet
            log(f"skipped {name!r}: {exc}")
    if busy[0]:
        log(f"  {busy[0]} timed refreshes found the loop's refresh in flight and did nothing")
    return timings


def time_call(call: Callable[[], object], budget: float = 0.3, batch: int = 200) -> float:
    """Median microseconds of this thread's CPU time per call, over batches: robust to a
    busy machine and to other threads holding the GIL, which wall-clock timing is not."""
    call()
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
        began = time.thread_time_ns()
        for _ in range(batch):
            call()
        samples.append((time.thread_time_ns() - began) / batch / 1000)
    return float(np.median(samples))
