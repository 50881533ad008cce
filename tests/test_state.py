"""Saved state across restarts (stateDir): the real Service over a real Prometheus, stopped and
started again on the same directory, read over REST and gRPC.

A manual clock drives both services: the data in Prometheus run two hours ahead, so the test
moves time on to bring new bins, and no bin arrives on its own while a test runs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
import requests

from forecaster import state
from forecaster.cli import main
from forecaster.config import ConfiguredTarget, load_settings
from forecaster.errors import InvalidInputError
from forecaster.refitting import restored_refit_due
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.spec import memory_estimate
from forecaster.state import LIVE_SUFFIX, MODEL_SUFFIX, StateStore, file_stem
from tests.support.prometheus import PrometheusServer
from tests.support.rest import make_blocks, metadata, settings
from tests.support.waiting import wait_for

WEB = "shop/web/web-rps"  # configured
API = "shop/api/api-rps"  # created by a scaler request
STEP = 300
FIT_SECONDS = 300  # a bound, not a wait: fit workers run at idle priority on a busy machine


class ManualClock:
    """Epoch seconds that move only when the test says."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Saved:
    """A state directory left by a stopped service, and what that service knew."""

    directory: Path
    stopped_at: float  # the clock when it stopped
    stop_seconds: float
    seen: dict[str, pd.Timestamp]
    scored: dict[str, int]
    keeper: dict[str, tuple[int, int, float]]  # intervals, misses, level
    model: dict[str, str]


@pytest.fixture(scope="module")
def state_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("state")
    with PrometheusServer(blocks_dir=make_blocks(root), workdir=root / "prom") as server:
        yield server


def _service(url: str, directory: Path, clock: ManualClock, **kwargs: Any) -> Service:
    web = ConfiguredTarget("shop", "web", metadata(url))
    base = settings(url, targets=(web,))
    return Service(replace(base, state_dir=directory), clock=clock, **kwargs)


def _register_api(service: Service, url: str, **changes: str) -> None:
    """KEDA's first calls for a target of its own: GetMetricSpec, then IsActive."""
    meta = metadata(url, metricName="api-rps", **changes)
    ref = pb.ScaledObjectRef(namespace="shop", name="api", scalerMetadata=meta)
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        stub.GetMetricSpec(ref, timeout=10)
        with contextlib.suppress(grpc.RpcError):
            stub.IsActive(ref, timeout=20)


def _view(service: Service, target_id: str) -> dict[str, Any]:
    response = requests.get(
        f"http://127.0.0.1:{service.http_port}/api/v1/targets/{target_id}", timeout=10
    )
    response.raise_for_status()
    return dict(response.json())


def _sample(service: Service, name: str, **labels: str) -> float:
    return service.registry.get_sample_value(name, labels) or 0.0


def _files(directory: Path, target_id: str) -> list[str]:
    stem = file_stem(target_id)
    return sorted(p.suffix for p in directory.iterdir() if p.name.startswith(stem))


@pytest.fixture(scope="module")
def saved(
    state_prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory
) -> Saved:
    """One service fits both targets, sees 15 more minutes of data, and stops: the state
    the tests restart from (each from a copy of its own)."""
    directory = tmp_path_factory.mktemp("saved") / "state"
    clock = ManualClock(time.time())
    service = _service(state_prometheus.url, directory, clock)
    service.start()
    try:
        _register_api(service, state_prometheus.url)
        engine = service.engine
        for tid in (WEB, API):
            wait_for(lambda tid=tid: engine.get(tid).fits, FIT_SECONDS, f"the first fit of {tid}")
        wait_for(lambda: _files(directory, API) == [LIVE_SUFFIX, MODEL_SUFFIX]
                 and _files(directory, WEB) == [LIVE_SUFFIX, MODEL_SUFFIX],
                 30, "the files saved after the first fits")
        clock.now += 3 * STEP  # three new bins: scored and judged, then saved at shutdown only
        for tid in (WEB, API):
            wait_for(lambda tid=tid: engine.run_refresh(tid), 30, f"a refresh of {tid}")
        seen = {tid: engine.get(tid).buffer.last for tid in (WEB, API)}
        scored = {tid: engine.get(tid).accuracy().scored for tid in (WEB, API)}
        keepers = {}
        for tid in (WEB, API):
            keeper = engine.get(tid).share_keeper
            assert keeper is not None
            controller = keeper.controller
            keepers[tid] = (controller.intervals, controller.misses, controller.level)
        model = {tid: str(engine.get(tid).snapshot.model) for tid in (WEB, API)}
        assert all(scored.values()) and all(k[0] for k in keepers.values()), (scored, keepers)
    finally:
        began = time.monotonic()
        service.stop()
        stop_seconds = time.monotonic() - began
    assert all(s is not None for s in seen.values())
    return Saved(directory, clock.now, stop_seconds, seen,  # type: ignore[arg-type]
                 scored, keepers, model)


@pytest.fixture
def copy_of(saved: Saved, tmp_path: Path) -> Path:
    target = tmp_path / "state"
    shutil.copytree(saved.directory, target)
    return target


@contextlib.contextmanager
def _running(service: Service) -> Iterator[Service]:
    service.start()
    try:
        yield service
    finally:
        service.stop()


# -- the round trip -----------------------------------------------------------------------


def test_shutdown_saves_what_changed_since_the_last_refit(saved: Saved) -> None:
    store = StateStore(saved.directory)
    assert store.saved_count() == 2
    loaded = {tid: store.read(tid) for tid in (WEB, API)}
    for tid in (WEB, API):
        assert loaded[tid].live.seen_through == saved.seen[tid]  # the shutdown's save
        model = loaded[tid].model
        assert model is not None
        assert model.last_timestamp_ == saved.seen[tid]  # saved again: it took three bins
        assert loaded[tid].live.configured == (tid == WEB)
    assert saved.stop_seconds < 15  # the saves' 5 s, the gRPC grace, the stops


def test_a_restart_serves_the_saved_model_before_any_refit(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    started = clock()
    clock.now += 1
    with _running(_service(state_prometheus.url, copy_of, clock)) as service:
        for tid in (WEB, API):  # API too, though no scaler request named it since
            view = wait_for(
                lambda tid=tid: (v := _view(service, tid))["forecastMadeAt"] and v,
                30, f"a forecast of {tid} after the restart",
            )
            target = service.engine.get(tid)
            assert view["forecastMadeAt"] > started
            assert target.snapshot.current_time is not None
            assert target.snapshot.current_time > started  # history read after the start
            assert view["restored"] is True
            assert view["fits"]["count"] == 0
            assert view["model"] == saved.model[tid]
            assert view["configured"] == (tid == WEB)
            # No bin since the stop: the accuracy and the SLO controller are as saved.
            assert target.buffer.last == saved.seen[tid]
            assert target.accuracy().scored == saved.scored[tid]
            keeper = target.share_keeper
            assert keeper is not None
            controller = keeper.controller
            assert (controller.intervals, controller.misses) == saved.keeper[tid][:2]
            assert controller.level == pytest.approx(saved.keeper[tid][2])
            assert service.engine.serve(tid).mode != "reactive"
        ready = requests.get(f"http://127.0.0.1:{service.http_port}/readyz", timeout=10)
        assert ready.status_code == 200


def test_new_bins_after_a_restart_are_judged_once(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    clock = ManualClock(saved.stopped_at + 2 * STEP)  # down for two bins
    with _running(_service(state_prometheus.url, copy_of, clock)) as service:
        target = service.engine.get(WEB)
        wait_for(lambda: target.snapshot.forecast, 30, "the first forecast after the restart")
        assert target.buffer.last == saved.seen[WEB] + pd.Timedelta(seconds=2 * STEP)
        keeper = target.share_keeper
        assert keeper is not None
        # Each new interval judged once, none of the saved ones again.
        assert keeper.controller.intervals == saved.keeper[WEB][0] + 2
        assert saved.scored[WEB] < target.accuracy().scored <= saved.scored[WEB] + 2
        model = target.model
        assert model is not None and model.last_timestamp_ == target.buffer.last
        assert target.fits == 0 and target.restored


# -- what is refused ----------------------------------------------------------------------


def _other_version(path: Path) -> None:
    header, _, payload = path.read_bytes().partition(b"\n")
    path.write_bytes(header.replace(b'"version": "', b'"version": "0.0.0-old') + b"\n" + payload)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x80\x05garbage, not a saved state\n\x00\xff" * 10)


def _unpicklable(path: Path) -> None:
    """A valid header and checksum over a pickle that names a class that does not exist."""
    import hashlib
    import json

    header = json.loads(path.read_bytes().partition(b"\n")[0])
    payload = b"cforecaster\nNothing\n."  # a GLOBAL that names no class, then STOP
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)


def _wrong_kinds(path: Path) -> None:
    """A valid header and checksum over a live state whose smoother is a string."""
    import hashlib
    import json
    import pickle

    line, _, payload = path.read_bytes().partition(b"\n")
    header = json.loads(line)
    live = replace(pickle.loads(payload), smoother="not a smoother")
    payload = pickle.dumps(live)
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)


def _mismatched_pair(directory: Path) -> None:
    """The live file of one target beside the model file of another's refit."""
    web, api = file_stem(WEB), file_stem(API)
    shutil.copy(directory / (api + MODEL_SUFFIX), directory / (web + MODEL_SUFFIX))


CORRUPTIONS = {
    "other-version": ("version", lambda d: _other_version(d / (file_stem(WEB) + LIVE_SUFFIX))),
    "truncated-model": ("corrupt", lambda d: _truncate(d / (file_stem(WEB) + MODEL_SUFFIX))),
    "garbage-live": ("corrupt", lambda d: _garbage(d / (file_stem(WEB) + LIVE_SUFFIX))),
    "unknown-class": ("corrupt", lambda d: _unpicklable(d / (file_stem(WEB) + MODEL_SUFFIX))),
    "mismatched-pair": ("corrupt", _mismatched_pair),
    "wrong-kinds": ("corrupt", lambda d: _wrong_kinds(d / (file_stem(WEB) + LIVE_SUFFIX))),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_snapshot_is_counted_logged_and_refitted(
    kind: str, saved: Saved, copy_of: Path, state_prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reason, corrupt = CORRUPTIONS[kind]
    corrupt(copy_of)
    clock = ManualClock(saved.stopped_at + 1)
    with caplog.at_level(logging.WARNING, logger="forecaster.state"), \
            _running(_service(state_prometheus.url, copy_of, clock)) as service:
        assert _sample(service, "forecaster_state_refused_total", reason=reason) == 1
        assert any("refused" in r.getMessage() and reason in r.getMessage()
                   for r in caplog.records), caplog.text
        web = service.engine.get(WEB)  # configured: registered anew from the config file
        wait_for(lambda: web.fits, FIT_SECONDS, "the refit of the refused target")
        assert not web.restored
        assert service.engine.get(API).restored  # the other target's files were fine
        ready = requests.get(f"http://127.0.0.1:{service.http_port}/readyz", timeout=10)
        assert ready.status_code == 200
        wait_for(lambda: _files(copy_of, WEB) == [LIVE_SUFFIX, MODEL_SUFFIX], 30,
                 "the refitted target's new files")


def test_a_saved_target_on_an_unconfigured_server_is_refused(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    base = settings("http://127.0.0.1:2")  # neither lists the saved targets' server
    other = Service(replace(base, state_dir=copy_of), clock=clock)
    with _running(other):
        assert _sample(other, "forecaster_state_refused_total", reason="server") == 2
        assert len(other.engine) == 0
    assert not list(copy_of.glob("*" + LIVE_SUFFIX))


def test_a_saved_target_over_a_lowered_memory_budget_is_refused(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    base = settings(state_prometheus.url)  # no configured target: the budget must not stop it
    estimate = memory_estimate(StateStore(copy_of).read(API).spec).total
    lowered = replace(base, state_dir=copy_of,
                      engine=replace(base.engine, target_memory_bytes=estimate - 1))
    other = Service(lowered, clock=clock)
    with caplog.at_level(logging.WARNING, logger="forecaster.state"), _running(other):
        assert _sample(other, "forecaster_state_refused_total", reason="memory") == 2
        assert len(other.engine) == 0
        refusals = [r.getMessage() for r in caplog.records if "refused (memory)" in r.getMessage()]
        assert len(refusals) == 2 and all("targetMemoryBytes" in m for m in refusals), refusals
    assert not list(copy_of.iterdir())


# -- the directory's life -----------------------------------------------------------------


def test_a_dropped_target_loses_its_files(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    with _running(_service(state_prometheus.url, copy_of, clock)) as service:
        assert _files(copy_of, API) == [LIVE_SUFFIX, MODEL_SUFFIX]
        clock.now += service.settings.engine.idle_seconds + 1  # API idle: nobody asked
        wait_for(lambda: API not in {t.target_id for t in service.engine.targets()}, 30,
                 "the idle target dropped")
        wait_for(lambda: not _files(copy_of, API), 30, "the dropped target's files removed")
        assert WEB in {t.target_id for t in service.engine.targets()}  # configured: stays


def test_an_unwritable_directory_is_counted_and_the_service_keeps_serving(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    with _running(_service(state_prometheus.url, copy_of, clock)) as service:
        engine = service.engine
        wait_for(lambda: engine.get(WEB).snapshot.forecast, 30, "the restored forecast")
        shutil.rmtree(copy_of)
        copy_of.write_text("not a directory any more")  # root writes through any mode bits
        engine.refit_now(WEB)
        wait_for(lambda: engine.get(WEB).fits, FIT_SECONDS, "the refit")
        wait_for(lambda: _sample(service, "forecaster_state_saves_total", outcome="failed"),
                 30, "the failed save counted")
        assert engine.get(WEB).unsaved  # tried again at the next save
        assert engine.serve(WEB).value > 0
        ready = requests.get(f"http://127.0.0.1:{service.http_port}/readyz", timeout=10)
        assert ready.status_code == 200


def test_shutdown_saves_stop_at_the_deadline(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    service = _service(state_prometheus.url, copy_of, clock)
    service.start()
    targets = list(service.engine.targets())
    for target in targets:
        wait_for(lambda t=target: t.snapshot.forecast, 30, "the restored forecasts")
    before = {p.name: p.read_bytes() for p in copy_of.iterdir()}
    service.scaler.stop()
    service.http_server.stop()
    with caplog.at_level(logging.WARNING, logger="forecaster.state"):
        service.engine.stop(save_seconds=0.0)
    assert "2 saves left unwritten" in caplog.text
    assert {p.name: p.read_bytes() for p in copy_of.iterdir()} == before


# -- readiness ----------------------------------------------------------------------------


class GatedStore(StateStore):
    """Loads only once the test opens the gate."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def load(self) -> Iterator[state.SavedTarget]:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        yield from super().load()


def test_readyz_is_503_until_the_saved_state_is_loaded(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    store = GatedStore(copy_of)
    service = _service(state_prometheus.url, copy_of, ManualClock(saved.stopped_at + 1),
                       state_store=store)
    starting = threading.Thread(target=service.start)
    starting.start()
    try:
        assert store.entered.wait(30)
        url = f"http://127.0.0.1:{service.http_port}"
        loading = requests.get(f"{url}/readyz", timeout=10)
        assert loading.status_code == 503
        assert "loading saved state (0 of 2 targets)" in loading.text
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        store.gate.set()
        starting.join(60)
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
        assert service.engine.get(API).restored
    finally:
        store.gate.set()
        starting.join(60)
        service.stop()


# -- settings -----------------------------------------------------------------------------


def test_state_dir_comes_from_the_file_then_the_environment_then_the_flag(
    tmp_path: Path
) -> None:
    path = tmp_path / "forecaster.yaml"
    path.write_text("stateDir: /from/file\n")
    assert load_settings(path, env={}).state_dir == Path("/from/file")
    env = {"FORECASTER_STATE_DIR": "/from/env"}
    assert load_settings(path, env=env).state_dir == Path("/from/env")
    flag = load_settings(path, env=env, overrides={"stateDir": Path("/from/flag")})
    assert flag.state_dir == Path("/from/flag")
    assert load_settings(None, env={}).state_dir is None
    with pytest.raises(InvalidInputError, match="stateDir"):
        load_settings(None, env={"FORECASTER_STATE_DIR": " "})


@pytest.mark.parametrize("origin", ["--state-dir", "FORECASTER_STATE_DIR (stateDir)"])
def test_an_unusable_state_dir_exits_2_with_one_line(
    origin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def serve(service: object) -> None:
        raise AssertionError("an unusable state dir must stop serve before it serves")

    monkeypatch.setattr("forecaster.service.run_until_signalled", serve)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unusable = str(blocker / "state")  # under a file: cannot be created, even by root
    argv = ["serve", "--grpc-port", "0", "--http-port", "0", "--host", "127.0.0.1"]
    monkeypatch.delenv("FORECASTER_STATE_DIR", raising=False)
    if origin == "--state-dir":
        argv += ["--state-dir", unusable]
    else:
        monkeypatch.setenv("FORECASTER_STATE_DIR", unusable)
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"forecaster: error: {origin}: cannot use {unusable!r}")


def test_a_target_replaced_by_a_new_spec_replaces_its_files(
    saved: Saved, copy_of: Path, state_prometheus: PrometheusServer
) -> None:
    clock = ManualClock(saved.stopped_at + 1)
    with _running(_service(state_prometheus.url, copy_of, clock)) as service:
        old = service.engine.get(API)
        assert old.restored and old.spec.target_value == 16.7
        _register_api(service, state_prometheus.url, targetValue="20")  # the same metric name
        new = service.engine.get(API)
        assert new is not old and old.retired and not new.restored
        wait_for(lambda: new.fits, FIT_SECONDS, "the new spec's first fit")

        def saved_value() -> float | None:
            try:
                return StateStore(copy_of).read(API).spec.target_value
            except state.Refused:  # removed with the old spec, not yet saved anew
                return None

        wait_for(lambda: saved_value() == 20.0, 30, "the new spec's files")


def test_restored_targets_refit_after_their_saved_fit_or_spread_when_past_due(
    saved: Saved,
) -> None:
    base = StateStore(saved.directory).read(WEB)
    now, refit = 2_000_000_000.0, 3600.0
    recent = state.SavedTarget(replace(base.live, fitted_at=now - 600), base.model)
    assert restored_refit_due(recent, now, refit) == now + 3000
    dues = [
        restored_refit_due(state.SavedTarget(
            replace(base.live, target_id=f"shop/web-{i}/m", fitted_at=now - 7200), base.model
        ), now, refit)
        for i in range(200)
    ]
    assert all(now <= due < now + refit for due in dues)
    quarters = {int((due - now) // (refit / 4)) for due in dues}
    assert quarters == {0, 1, 2, 3}  # spread over the interval, not all at once
    assert restored_refit_due(state.SavedTarget(base.live, None), now, refit) == now
