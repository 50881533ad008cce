"""Who may call what over real HTTP, and what the HTTP side holds up against: the API token on
every route but the probes (over the app's own URL map), the scrape token on /metrics alone, the
page's sign-in and session cookie, Prometheus queries off by default, idle connections that
must not starve the probes, and ad-hoc fits that run outside the serving process.

The services run for real (waitress on 127.0.0.1, port 0) over a real Prometheus."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from forecaster.api import create_app
from forecaster.api.adhoc import OOM_SCORE_ADJ, AdhocJob, AdhocRunner
from forecaster.api.auth import SESSION_COOKIE, SESSION_SECONDS, session_cookie
from forecaster.api.errors import Busy
from forecaster.api.openapi import openapi_document
from forecaster.api.routes import ADHOC_KEY
from forecaster.api.server import CONNECTION_LIMIT
from forecaster.config import ConfiguredTarget, EngineSettings, Settings, load_settings
from forecaster.engine import Engine
from forecaster.errors import InvalidInputError
from forecaster.service import Service
from forecaster.targets import SourceRegistry, TargetResolver
from tests.support.processes import assert_child_ends_with_parent
from tests.support.prometheus import PrometheusServer
from tests.support.rest import (
    WEB_QUERY,
    assert_error,
    make_blocks,
    metadata,
    settings,
    strict_json,
)
from tests.support.waiting import wait_for

TOKEN = "api-t0ken-never-shown"
SCRAPE = "scrape-t0ken-never-shown"
WEB = "shop/web/web-rps"
PROBES = frozenset({"/healthz", "/readyz"})
SIGN_IN = "/login"
IDLE_CONNECTIONS = 500
KEDA_EXAMPLES = Path(__file__).parent.parent / "keda" / "examples"


# -- the app's routes, for parametrizing ---------------------------------------------------


def _url_map() -> list[tuple[str, str]]:
    """(rule, method) of every route the app serves, from an app built here."""
    engine = Engine(EngineSettings(), fit_pool=ThreadPoolExecutor(1))
    try:
        app = create_app(Settings(), engine, TargetResolver(engine, Settings(), SourceRegistry(())))
        return sorted(
            (rule.rule, method)
            for rule in app.url_map.iter_rules()
            if rule.endpoint != "static"
            for method in rule.methods or ()
            if method not in ("HEAD", "OPTIONS")
        )
    finally:
        engine.stop()


ROUTES = _url_map()
GUARDED = [(rule, method) for rule, method in ROUTES if rule not in PROBES | {SIGN_IN}]


def _concrete(rule: str) -> str:
    """A URL for a rule, naming the configured target."""
    values = dict(zip(("namespace", "name", "metric"), WEB.split("/"), strict=True))
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: values[m.group(1)], rule)


def _points(n: int) -> list[dict[str, Any]]:
    stamps = pd.date_range("2024-05-01", periods=n, freq="5min", tz="UTC")
    values = 100 + 50 * np.sin(2 * np.pi * np.arange(n) / 288)
    return [{"timestamp": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": float(v)}
            for t, v in zip(stamps, values, strict=True)]


INLINE = {"series": _points(300), "model": "naive", "horizon": 3}


# -- services ------------------------------------------------------------------------------


@dataclass
class Served:
    service: Service

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    def call(self, method: str, path: str, *, token: str | None = None,
             **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("allow_redirects", False)
        return requests.request(method, f"{self.base}{path}", headers=headers, timeout=60,
                                **kwargs)

    def query_body(self) -> dict[str, Any]:
        url = self.service.settings.servers[0].url
        return {"serverAddress": url, "query": WEB_QUERY, "historyWindow": "1d",
                "model": "naive", "horizon": 3}


@contextmanager
def _serving(config: Settings) -> Iterator[Served]:
    service = Service(config)
    service.start()
    try:
        yield Served(service)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def security_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("security")
    with PrometheusServer(blocks_dir=make_blocks(root), workdir=root / "prom") as server:
        yield server


@pytest.fixture(scope="module")
def secured(security_prometheus: PrometheusServer) -> Iterator[Served]:
    """apiToken, metricsToken and queries on; one configured target with a forecast."""
    url = security_prometheus.url
    web = ConfiguredTarget("shop", "web", metadata(url, model="naive"))
    config = settings(url, targets=(web,), api_token=TOKEN, metrics_token=SCRAPE,
                      allow_queries=True)
    with _serving(config) as served:
        wait_for(lambda: served.service.engine.get(WEB).snapshot.forecast is not None, timeout=90)
        yield served


@pytest.fixture(scope="module")
def default(security_prometheus: PrometheusServer) -> Iterator[Served]:
    """What a config without tokens or an `api:` section gives."""
    with _serving(settings(security_prometheus.url)) as served:
        yield served


# -- the API token on every route but the probes -------------------------------------------


CREDENTIALS = {
    "none": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "scheme": {"Authorization": f"Basic {TOKEN}"},
    "metrics-token": {"Authorization": f"Bearer {SCRAPE}"},  # opens /metrics, tested below
}
REFUSED = [(rule, method, credentials) for rule, method in GUARDED for credentials in CREDENTIALS
           if not (credentials == "metrics-token" and rule == "/metrics")]


@pytest.mark.parametrize(("rule", "method", "credentials"), REFUSED,
                         ids=[f"{m} {r} {c}" for r, m, c in REFUSED])
def test_every_route_but_the_probes_needs_the_api_token(
    secured: Served, rule: str, method: str, credentials: str
) -> None:
    headers = CREDENTIALS[credentials]
    response = secured.call(method, _concrete(rule), headers=headers, json=INLINE)
    error = assert_error(response, 401, "unauthenticated", "Authorization")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for secret in (TOKEN, SCRAPE, WEB, WEB_QUERY):  # nothing of the service shows
        assert secret not in response.text
    assert "apiToken" in error["message"]


@pytest.mark.parametrize(("rule", "method"), GUARDED, ids=[f"{m} {r}" for r, m in GUARDED])
def test_every_route_answers_with_the_api_token(secured: Served, rule: str, method: str) -> None:
    body = INLINE if rule == "/api/v1/forecast" else None
    response = secured.call(method, _concrete(rule), token=TOKEN, json=body)
    assert response.status_code == 200, (rule, response.status_code, response.text[:300])


@pytest.mark.parametrize("path", sorted(PROBES))
def test_the_probes_need_no_token(secured: Served, path: str) -> None:
    assert secured.call("GET", path).status_code == 200
    assert secured.call("GET", path, token="wrong").status_code == 200


def test_an_unknown_route_is_401_before_404(secured: Served) -> None:
    assert_error(secured.call("GET", "/api/v1/no-such-route"), 401, "unauthenticated")
    assert_error(secured.call("GET", "/api/v1/no-such-route", token=TOKEN), 404, "not_found")


# -- the scrape token ----------------------------------------------------------------------


def test_the_metrics_token_opens_metrics(secured: Served) -> None:
    response = secured.call("GET", "/metrics", token=SCRAPE)
    assert response.status_code == 200
    assert "forecaster_planned_load" in response.text
    assert secured.call("GET", "/metrics", token=TOKEN).status_code == 200


def test_a_metrics_token_alone_guards_only_metrics(security_prometheus: PrometheusServer) -> None:
    with _serving(settings(security_prometheus.url, metrics_token=SCRAPE)) as served:
        error = assert_error(served.call("GET", "/metrics"), 401, "unauthenticated")
        assert "metricsToken" in error["message"] and "apiToken" not in error["message"]
        assert served.call("GET", "/metrics", token=SCRAPE).status_code == 200
        assert served.call("GET", "/api/v1/targets").status_code == 200
        assert served.call("GET", "/").status_code == 200


# -- the page: sign in once, then a cookie -------------------------------------------------


def _sign_in(served: Served, session: requests.Session, token: str) -> requests.Response:
    return session.post(f"{served.base}{SIGN_IN}", data={"token": token}, timeout=10,
                        allow_redirects=False)


def test_a_browser_without_the_cookie_is_sent_to_the_sign_in_form(secured: Served) -> None:
    response = secured.call("GET", "/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert response.status_code == 303 and response.headers["Location"] == "login"
    form = secured.call("GET", SIGN_IN)
    assert form.status_code == 200 and form.headers["Content-Type"].startswith("text/html")
    assert '<form method="post" action="login">' in form.text
    assert 'type="password"' in form.text and 'name="token"' in form.text
    assert "form-action 'self'" in form.headers["Content-Security-Policy"]


def test_signing_in_sets_a_session_cookie_that_reads_the_page_and_plots(secured: Served) -> None:
    with requests.Session() as browser:
        response = _sign_in(secured, browser, TOKEN)
        assert response.status_code == 303 and response.headers["Location"] == "./"
        cookie = SimpleCookie(response.headers["Set-Cookie"])[SESSION_COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert int(cookie["max-age"]) == SESSION_SECONDS
        assert TOKEN not in response.headers["Set-Cookie"]

        page = browser.get(f"{secured.base}/", timeout=10)
        assert page.status_code == 200 and WEB in page.text
        plots = re.findall(r'<img class="plot" src="([^"]+)"', page.text)
        assert plots
        for src in plots:
            plot = browser.get(f"{secured.base}{src}", timeout=30)
            assert plot.status_code == 200 and plot.headers["Content-Type"] == "image/png"
        for path in ("/metrics", "/api/v1/targets", "/openapi.json"):
            assert browser.get(f"{secured.base}{path}", timeout=10).status_code == 200
        # The cookie reads; it never writes.
        posted = browser.post(f"{secured.base}/api/v1/forecast", json=INLINE, timeout=60)
        assert_error(posted, 401, "unauthenticated")


def test_a_wrong_token_goes_back_to_the_form_without_a_cookie(secured: Served) -> None:
    with requests.Session() as browser:
        response = _sign_in(secured, browser, "not-the-token")
        assert response.status_code == 303
        assert response.headers["Location"] == "login#wrong-token"
        assert "Set-Cookie" not in response.headers
        assert SESSION_COOKIE not in browser.cookies
    assert_error(secured.call("POST", SIGN_IN, data={}), 400, "invalid_argument", "token")
    assert_error(secured.call("POST", SIGN_IN, data={"token": "  "}), 400, "invalid_argument",
                 "token")


def _tampered(cookie: str) -> str:
    """The cookie with its signature's last hex digit changed (never to the same digit)."""
    return cookie[:-1] + ("1" if cookie.endswith("0") else "0")


@pytest.mark.parametrize(
    "cookie",
    [
        session_cookie(TOKEN, int(time.time()) - 1),  # expired
        session_cookie("another-token", int(time.time()) + 3600),  # made with another token
        _tampered(session_cookie(TOKEN, int(time.time()) + 3600)),
        f"{int(time.time()) + 3600}.{TOKEN}",  # the token itself is not a session
        TOKEN,
        "",
    ],
    ids=["expired", "other-token", "tampered", "token-inside", "token", "empty"],
)
def test_only_a_current_cookie_from_this_token_reads(secured: Served, cookie: str) -> None:
    response = secured.call("GET", "/api/v1/targets", cookies={SESSION_COOKIE: cookie})
    assert_error(response, 401, "unauthenticated")
    fresh = session_cookie(TOKEN, int(time.time()) + 60)
    good = secured.call("GET", "/api/v1/targets", cookies={SESSION_COOKIE: fresh})
    assert good.status_code == 200


def test_without_an_api_token_the_sign_in_form_says_the_page_is_open(default: Served) -> None:
    assert "No apiToken is configured" in default.call("GET", SIGN_IN).text
    response = default.call("POST", SIGN_IN, data={"token": "anything"})
    assert response.status_code == 303 and "Set-Cookie" not in response.headers
    assert default.call("GET", "/").status_code == 200


# -- Prometheus queries through the API ----------------------------------------------------


def test_queries_are_off_by_default_with_a_json_error_naming_the_setting(
    default: Served,
) -> None:
    response = default.call("POST", "/api/v1/forecast", json=default.query_body())
    error = assert_error(response, 403, "permission_denied", "query")
    assert "api: {allowQueries: true}" in error["message"]
    assert "apiToken" in error["message"] and "'series'" in error["message"]
    # Refused before anything is validated or sent: no Prometheus is asked.
    body = {"serverAddress": "http://elsewhere:9090", "query": "up"}
    assert_error(default.call("POST", "/api/v1/forecast", json=body), 403, "permission_denied")


def test_inline_series_stay_open_without_a_token(default: Served) -> None:
    answer = strict_json(default.call("POST", "/api/v1/forecast", json=INLINE))
    assert answer["model"] == "naive" and len(answer["points"]) == 3


def test_queries_allowed_without_an_api_token_are_still_refused(
    security_prometheus: PrometheusServer,
) -> None:
    with _serving(settings(security_prometheus.url, allow_queries=True)) as served:
        response = served.call("POST", "/api/v1/forecast", json=served.query_body())
        error = assert_error(response, 403, "permission_denied", "query")
        assert "apiToken" in error["message"]


def test_queries_on_need_the_api_token_and_then_answer(secured: Served) -> None:
    body = secured.query_body()
    assert_error(secured.call("POST", "/api/v1/forecast", json=body), 401, "unauthenticated")
    assert_error(secured.call("POST", "/api/v1/forecast", json=body, token=SCRAPE), 401,
                 "unauthenticated")
    answer = strict_json(secured.call("POST", "/api/v1/forecast", json=body, token=TOKEN))
    assert answer["historyPoints"] == 288 and len(answer["points"]) == 3


# -- the settings --------------------------------------------------------------------------


def _config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def test_tokens_and_the_api_section_are_read_from_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "api").write_text(f"{TOKEN}\n")
    (tmp_path / "scrape").write_text(f"{SCRAPE}\n")
    raw = {"apiToken": {"file": str(tmp_path / "api")},
           "metricsToken": {"file": str(tmp_path / "scrape")},
           "api": {"allowQueries": True}}
    loaded = load_settings(_config(tmp_path, raw), env={})
    assert (loaded.api_token, loaded.metrics_token) == (TOKEN, SCRAPE)
    assert loaded.api.allow_queries is True
    assert TOKEN not in repr(loaded) and SCRAPE not in repr(loaded)
    assert load_settings(env={}).api.allow_queries is False
    from_env = load_settings(env={"FORECASTER_METRICS_TOKEN": f"{SCRAPE}\n"})
    assert from_env.metrics_token == SCRAPE
    from_file = load_settings(env={"FORECASTER_METRICS_TOKEN_FILE": str(tmp_path / "scrape")})
    assert from_file.metrics_token == SCRAPE


@pytest.mark.parametrize(
    ("raw", "env", "field"),
    [
        ({"api": {"allowQueries": True}}, {}, "api.allowQueries"),
        ({"api": {"allowQueries": "yes"}}, {}, "api.allowQueries"),
        ({"api": {"allowQuery": True}}, {}, "api.allowQuery"),
        ({"api": ["allowQueries"]}, {}, "api"),
        ({"metricsToken": SCRAPE}, {}, "metricsToken"),  # never inline
        ({"metricsToken": {"env": "EMPTY"}}, {"EMPTY": " \n"}, "metricsToken.env"),
        ({"apiToken": {"env": "EMPTY"}}, {"EMPTY": ""}, "apiToken.env"),
        # From the environment: the variable is named, with the setting it gives.
        ({}, {"FORECASTER_METRICS_TOKEN": ""}, "FORECASTER_METRICS_TOKEN (metricsToken.env)"),
    ],
)
def test_bad_security_settings_name_their_field(
    tmp_path: Path, raw: dict[str, Any], env: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        load_settings(_config(tmp_path, raw), env=env)
    assert refused.value.field == field
    assert SCRAPE not in str(refused.value)


# -- idle connections never starve the probes ----------------------------------------------


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Room for the idle connections' both ends (client and server run in this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * IDLE_CONNECTIONS
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"the open-file limit {hard} is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def _idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_probes_answer_with_500_idle_connections_open(
    default: Served, many_descriptors: None
) -> None:
    with _idle_connections(default.service.http_port, IDLE_CONNECTIONS) as sockets:
        for path in ("/healthz", "/readyz", "/healthz"):
            began = time.monotonic()
            response = requests.get(f"{default.base}{path}", timeout=5)  # the bounded wait
            assert response.status_code == 200, response.text
            print(f"{path} with {IDLE_CONNECTIONS} idle connections: "
                  f"{(time.monotonic() - began) * 1000:.0f} ms")
        # Room was made by closing idle connections: the server holds at most its limit.
        wait_for(lambda: sum(map(_closed_by_server, sockets))
                 >= IDLE_CONNECTIONS - CONNECTION_LIMIT, timeout=10)


def test_a_request_in_flight_is_not_closed_to_make_room(
    security_prometheus: PrometheusServer, many_descriptors: None
) -> None:
    """The first ad-hoc forecast of a fresh service waits for its worker process to start, then
    for a model selection (seconds): idle connections pile up past the limit meanwhile."""
    body = {"series": _points(6000), "model": "auto", "horizon": 12}
    opened: list[socket.socket] = []
    answered: list[requests.Response | requests.RequestException] = []

    def post(served: Served) -> None:
        try:
            answered.append(served.call("POST", "/api/v1/forecast", json=body))
        except requests.RequestException as exc:  # the connection closed under it
            answered.append(exc)

    with _serving(settings(security_prometheus.url)) as served:
        runner: AdhocRunner = served.service.app.extensions[ADHOC_KEY]
        thread = threading.Thread(target=post, args=(served,))
        thread.start()
        try:
            wait_for(lambda: runner.started, timeout=30)  # the request is in its worker now
            while thread.is_alive() and len(opened) < IDLE_CONNECTIONS:
                opened.append(socket.create_connection(
                    ("127.0.0.1", served.service.http_port), timeout=10))
            at_answer = len(opened) if not thread.is_alive() else IDLE_CONNECTIONS
            thread.join(timeout=120)
        finally:
            thread.join(timeout=120)
            for sock in opened:
                sock.close()
    assert answered, "no answer"
    assert at_answer > CONNECTION_LIMIT, f"the forecast ended after {at_answer} connections"
    (answer,) = answered
    assert isinstance(answer, requests.Response), answer
    assert answer.status_code == 200, answer.text


# -- ad-hoc forecasts run in a worker process ----------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_an_adhoc_forecast_runs_in_a_worker_of_normal_priority_first_for_the_oom_killer(
) -> None:
    runner = AdhocRunner()
    body = {"series": _points(600), "model": "seasonal_naive", "horizon": 12}
    try:
        with runner.reserve() as slot:
            answer = slot.run(AdhocJob(body=json.dumps(body).encode()))
        assert answer.error is None and answer.json is not None
        assert len(json.loads(answer.json)["points"]) == 12
        worker = answer.worker_pid
        assert worker not in (0, os.getpid())
        assert os.getpriority(os.PRIO_PROCESS, worker) == os.getpriority(os.PRIO_PROCESS, 0)
        oom = Path(f"/proc/{worker}/oom_score_adj").read_text()
        assert int(oom) == OOM_SCORE_ADJ > int(Path("/proc/self/oom_score_adj").read_text())
    finally:
        runner.close()


def test_idle_workers_are_shut_down() -> None:
    runner = AdhocRunner(idle_seconds=0.5)
    body = {"series": _points(50), "model": "naive", "horizon": 1}
    try:
        with runner.reserve() as slot:
            worker = slot.run(AdhocJob(body=json.dumps(body).encode())).worker_pid
        wait_for(lambda: not runner.started and _gone(worker), timeout=30)
    finally:
        runner.close()


ADHOC_ENGINE = """
import sys, threading
from forecaster.api.adhoc import AdhocJob, AdhocRunner

runner = AdhocRunner()
with runner.reserve() as slot:
    print(slot.run(AdhocJob(body=sys.argv[1].encode())).worker_pid, flush=True)
threading.Event().wait()
"""



def test_killing_the_engines_process_ends_its_adhoc_worker() -> None:
    body = json.dumps({"series": _points(50), "model": "naive", "horizon": 1})
    assert_child_ends_with_parent([sys.executable, "-c", ADHOC_ENGINE, body],
                                  "the orphaned ad-hoc worker's exit",
                                  cwd=Path(__file__).parent.parent)


def test_a_refusal_in_the_worker_comes_back_with_its_field() -> None:
    runner = AdhocRunner()
    too_short = {"series": _points(1), "model": "naive"}
    bad_value = {"series": [*_points(3000)[:-1], {"timestamp": "2024-06-01T00:00:00Z",
                                                   "value": -1}]}
    try:
        with runner.reserve() as slot:
            short = slot.run(AdhocJob(body=json.dumps(too_short).encode()))
            bad = slot.run(AdhocJob(body=json.dumps(bad_value).encode()))
            query = slot.run(AdhocJob(body=b'{"serverAddress": "http://p:9090", "query": "up"}'))
        assert short.json is None and short.error is not None
        assert short.error[0] == "unprocessable" and short.error[2] == "series"
        assert "needs at least" in short.error[1]
        assert bad.error == ("invalid", bad.error[1], "series[2999].value")
        assert query.json is None and query.query is not None and query.query.query == "up"
    finally:
        runner.close()


def test_a_large_body_is_parsed_in_the_worker_and_refused_with_its_field(
    default: Served,
) -> None:
    points = _points(3000)
    points[1500] = {"timestamp": points[1500]["timestamp"], "value": "many"}
    response = default.call("POST", "/api/v1/forecast", json={"series": points})
    assert_error(response, 400, "invalid_argument", "series[1500].value")
    padded = json.dumps(default.query_body()) + " " * 20_000  # a query body past the early check
    response = default.call("POST", "/api/v1/forecast", data=padded,
                            headers={"Content-Type": "application/json"})
    assert "allowQueries" in assert_error(response, 403, "permission_denied", "query")["message"]


def test_slots_are_given_back_when_a_reservation_is_not_used() -> None:
    runner = AdhocRunner(slots=1)
    with runner.reserve():
        with pytest.raises(Busy, match="already running") as refused:
            runner.reserve()
        assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    with runner.reserve():  # given back on leaving the block
        pass
    runner.close()


# -- the document and the examples say what the code does ----------------------------------


def test_the_openapi_document_states_each_operations_security() -> None:
    document = openapi_document()
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"bearerAuth", "metricsToken", "sessionCookie"}
    assert schemes["sessionCookie"]["name"] == SESSION_COOKIE
    flask_paths = {re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule) for rule, _ in ROUTES}
    assert set(document["paths"]) == flask_paths
    for path, item in document["paths"].items():
        for method, operation in item.items():
            names = {name for option in operation["security"] for name in option}
            if path in PROBES | {SIGN_IN}:
                assert operation["security"] == [], (path, method)
                continue
            assert "bearerAuth" in names and "401" in operation["responses"], (path, method)
            assert ("metricsToken" in names) == (path == "/metrics"), (path, method)
            assert ("sessionCookie" in names) == (method == "get"), (path, method)
    adhoc = document["paths"]["/api/v1/forecast"]["post"]
    assert "403" in adhoc["responses"] and "allowQueries" in adhoc["description"]


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def test_the_metrics_api_example_sends_the_api_token_keda_style(secured: Served) -> None:
    """KEDA's metrics-api trigger with `authMode: bearer` sends `Authorization: Bearer <the
    TriggerAuthentication's token parameter>`; the example wires it to a Secret."""
    docs = _yaml_docs(KEDA_EXAMPLES / "metrics-api" / "scaledobject.yaml")
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["metadata"]["namespace"] == scaled["metadata"]["namespace"]
    assert trigger["metadata"]["authMode"] == "bearer"
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "token" and ref["name"] and ref["key"]
    path = f"/api/v1/targets/{WEB}/metric"  # the example's route, on this test's target
    assert re.fullmatch(r"http://[^/]+/api/v1/targets/[^/]+/[^/]+/[^/]+/metric",
                        trigger["metadata"]["url"])
    assert_error(secured.call("GET", path), 401, "unauthenticated")
    assert secured.call("GET", path, token=TOKEN).status_code == 200


def test_the_service_monitor_scrapes_with_a_bearer_token(secured: Served) -> None:
    docs = _yaml_docs(KEDA_EXAMPLES / "monitoring" / "servicemonitors.yaml")
    (monitor,) = [d for d in docs if d["metadata"]["name"] == "forecaster"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"
    assert set(endpoint["authorization"]["credentials"]) == {"name", "key"}
    assert_error(secured.call("GET", endpoint["path"]), 401, "unauthenticated")
    assert secured.call("GET", endpoint["path"], token=SCRAPE).status_code == 200
