"""The HTTP interface: a Flask app factory, served in-process by waitress beside the engine."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

from flask import Flask, Response, jsonify, request
from waitress.channel import HTTPChannel

from forecaster.api.adhoc import AdhocRunner
from forecaster.api.auth import require_tokens
from forecaster.api.errors import error_response, register_error_handlers
from forecaster.api.inputs import check_query_keys
from forecaster.api.openapi import openapi_path, query_parameters
from forecaster.api.server import IdleEvictingServer
from forecaster.config import Settings
from forecaster.engine import Engine
from forecaster.errors import InvalidInputError
from forecaster.targets import TargetResolver
from forecaster.telemetry import Telemetry

HTTP_THREADS = 8
LOOP_SLICE_SECONDS = 0.2
MAX_BODY_BYTES = 2 * 1024 * 1024


def create_app(
    settings: Settings,
    engine: Engine,
    resolver: TargetResolver,
    *,
    telemetry: Telemetry | None = None,
    liveness: Callable[[], str | None] | None = None,
    readiness: Callable[[], str | None] | None = None,
) -> Flask:
    """The Flask app for one engine; no global state, so tests build as many as they like.

    With `telemetry`, /metrics serves its registry and every request is counted. `liveness`
    says why the process cannot serve (None when it can), for /healthz; `readiness` why it
    should get no new connections, for /readyz.
    """
    app = Flask("forecaster", static_folder=None)  # every route is in /openapi.json
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # larger bodies: 413
    app.extensions["forecaster.engine"] = engine
    app.extensions["forecaster.resolver"] = resolver
    if telemetry is not None:
        app.extensions["forecaster.telemetry"] = telemetry
    if liveness is not None:
        app.extensions["forecaster.liveness"] = liveness
    if readiness is not None:
        app.extensions["forecaster.readiness"] = readiness

    @app.get("/healthz")
    def healthz() -> Response | tuple[Response, int]:
        """200 while the process serves, its gRPC front answers and its fit pool can start
        workers; 503 with the reason when the front is stuck or the fit pool cannot be
        rebuilt, so that the liveness probe restarts the pod."""
        problem = app.extensions.get("forecaster.liveness", lambda: None)()
        if problem is not None:
            return error_response(503, problem, retry_after=1)
        return jsonify(status="ok"), 200

    from forecaster.api import pages, routes

    app.register_blueprint(routes.blueprint)
    app.register_blueprint(pages.blueprint)
    register_error_handlers(app)
    require_tokens(app, settings.api_token, settings.metrics_token)
    app.before_request(_only_documented_query_parameters)  # after the token check
    return app


def _only_documented_query_parameters() -> None:
    """400 for a query parameter the route does not take, or one given twice, before the route
    reads any: a misspelt or repeated one would otherwise be silently ignored."""
    rule = request.url_rule
    if rule is None or request.method == "OPTIONS":  # no route (404, 405), or CORS preflight
        return
    allowed = query_parameters(openapi_path(rule.rule), request.method) or frozenset()
    check_query_keys([key for key, _ in request.args.items(multi=True)], allowed)


class HttpServer:
    """waitress in a thread of this process, beside the engine, with a clean stop.

    waitress's own run() only ends on a signal; here the loop polls in short slices and
    checks a flag, so stop() never closes sockets under a running loop. Idle connections
    never keep the probes out (forecaster/api/server.py).
    """

    def __init__(self, app: Flask, host: str, port: int, threads: int = HTTP_THREADS) -> None:
        self._app = app
        try:
            server = IdleEvictingServer(app, host=host, port=port, threads=threads,
                                        ident="forecaster")
        except OSError as exc:  # a taken or privileged port
            raise InvalidInputError(
                "httpPort", f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}: choose "
                f"a free port (--http-port, httpPort in the config or FORECASTER_HTTP_PORT), "
                f"or stop what listens there",
            ) from None
        self._server = cast(Any, server)
        self.port = int(self._server.effective_port)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            # poll(), not select(): select() fails once a descriptor number passes 1024.
            self._server.asyncore.loop(
                timeout=LOOP_SLICE_SECONDS, map=self._server._map, count=1, use_poll=True
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._server.task_dispatcher.shutdown()
        # Connections still open (a client's keep-alive, or a close not yet read) would leak
        # their sockets: the loop that would have closed them has stopped.
        for dispatcher in list(self._server._map.values()):
            if isinstance(dispatcher, HTTPChannel):
                dispatcher.close()
        self._server.close()
        for extension in self._app.extensions.values():
            if isinstance(extension, AdhocRunner):
                extension.close()  # ad-hoc forecasts' worker processes
