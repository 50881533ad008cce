"""A proxy in front of a real Prometheus that records what each request carried: the
credentials' headers, and the query, so a test counts what forecaster sent. A query holding
one of `refused`'s markers is answered 503 instead, as an overloaded Prometheus would."""

from __future__ import annotations

import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast


class RecordingProxy(ThreadingHTTPServer):
    """Forwards GET requests to Prometheus and records the headers that carry credentials."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests_for(self, marker: str) -> list[tuple[str, str | None, str | None]]:
        quoted = urllib.parse.quote_plus(marker)
        with self.lock:
            return [seen for seen in self.seen if quoted in seen[0]]

    def refuses(self, path: str) -> bool:
        with self.lock:
            return any(urllib.parse.quote_plus(marker) in path for marker in self.refused)


class _Forward(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        proxy = cast(RecordingProxy, self.server)
        with proxy.lock:
            proxy.seen.append(
                (self.path, self.headers.get("Authorization"), self.headers.get("X-Scope-OrgID"))
            )
        if proxy.refuses(self.path):
            status = 503
            body = b'{"status": "error", "errorType": "unavailable", "error": "overloaded"}'
        else:
            try:
                with urllib.request.urlopen(proxy.upstream + self.path, timeout=10) as answer:
                    status, body = answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean
