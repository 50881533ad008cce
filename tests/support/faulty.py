"""A Prometheus API that misbehaves on purpose, for the tests and benches of what forecaster
does with a reply it must refuse: one far too large (streamed in chunks, as Prometheus streams
a large result), an HTML page (a login proxy in front of the URL), a redirect, or an empty
result. The fault is chosen by a marker in the query's text (`large`, `html`, `redirect`,
`empty`), else the server's `default`; every path answers alike, so whatever the client asks
gets the fault. Each answer is recorded, with the body bytes written before the client hung up.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self, cast

LARGE = "large"
HTML = "html"
REDIRECT = "redirect"
EMPTY = "empty"
FAULTS = (LARGE, HTML, REDIRECT, EMPTY)
CHUNK_BYTES = 64 * 1024
POINTS_PER_SERIES = 60  # a range reply's values per series: an hour at a minute
LOGIN_PAGE = (b"<!doctype html><html><head><title>Sign in</title></head><body>"
              b"<form method='post' action='/login'><input name='user'></form></body></html>")


@dataclass
class Reply:
    """One answer: its path, query and fault, when it began (time.monotonic), the body bytes
    written to the socket, whether the client hung up before the end, and whether it is over."""

    path: str
    query: str
    fault: str
    began: float = field(default_factory=time.monotonic)
    written: int = 0
    hung_up: bool = False
    done: bool = False


class FaultyPrometheus(ThreadingHTTPServer):
    """Serves on 127.0.0.1 (port 0) in a thread of its own while open::

        with FaultyPrometheus(reply_bytes=4_000_000) as server:
            config = PrometheusServerConfig(url=server.url, max_reply_bytes=1024 * 1024)
            ...
            server.replies  # what each request got, and how much of it was sent

    A large reply is a valid success body of at least `reply_bytes` bytes, one series per
    pod (as an unaggregated query returns), sent with chunked transfer encoding (no
    Content-Length, so the client learns its size only by reading it), at most
    `bytes_per_second` when set.
    """

    daemon_threads = True

    def __init__(self, *, reply_bytes: int = 60_000_000, default: str = LARGE,
                 bytes_per_second: float = 0.0) -> None:
        if default not in FAULTS:
            raise ValueError(f"default must be one of {FAULTS}, got {default!r}")
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reply_bytes = reply_bytes
        self.default = default
        self.bytes_per_second = bytes_per_second
        self.replies: list[Reply] = []
        self.lock = threading.Lock()
        self._bodies: dict[bool, list[bytes]] = {}
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,),
                                        name="faulty-prometheus", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault_for(self, query: str) -> str:
        return next((fault for fault in FAULTS if fault in query), self.default)

    def answered(self, fault: str | None = None) -> list[Reply]:
        """The replies over so far (of `fault` only, when given)."""
        with self.lock:
            return [r for r in self.replies if r.done and fault in (None, r.fault)]

    def in_flight(self) -> int:
        with self.lock:
            return sum(1 for r in self.replies if not r.done)

    def body(self, matrix: bool) -> list[bytes]:
        """The large reply's chunks (a range query's matrix, or an instant vector), made once."""
        with self.lock:
            if matrix not in self._bodies:
                self._bodies[matrix] = _success_body(self.reply_bytes, matrix)
            return self._bodies[matrix]

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up is what this server is for


def _success_body(size: int, matrix: bool) -> list[bytes]:
    kind = b"matrix" if matrix else b"vector"
    head = b'{"status":"success","data":{"resultType":"%s","result":[' % kind
    tail = b"]}}"
    now = time.time()
    values = b",".join(b'[%.3f,"%d.5"]' % (now - 60 * (POINTS_PER_SERIES - k), k)
                       for k in range(POINTS_PER_SERIES))
    point = b'"values":[%s]' % values if matrix else b'"value":[%.3f,"12.5"]' % now
    chunks: list[bytes] = []
    chunk, total, pod = bytearray(head), len(head), 0
    while total < size:
        item = (b'%s{"metric":{"__name__":"http_requests_total","job":"web","pod":"web-%08d"},'
                b'%s}' % (b"," if pod else b"", pod, point))
        chunk += item
        total += len(item)
        pod += 1
        if len(chunk) >= CHUNK_BYTES:
            chunks.append(bytes(chunk))
            chunk.clear()
    chunk += tail
    chunks.append(bytes(chunk))
    return chunks


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(urllib.parse.urlsplit(self.path).query)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._answer(self.rfile.read(length).decode("utf-8", "replace"))

    def _answer(self, form: str) -> None:
        server = cast(FaultyPrometheus, self.server)
        path = urllib.parse.urlsplit(self.path).path
        query = urllib.parse.parse_qs(form).get("query", [""])[0]
        reply = Reply(path, query, server.fault_for(query))
        with server.lock:
            server.replies.append(reply)
        try:
            if reply.fault == REDIRECT:
                self.send_response(302)
                self.send_header("Location", f"{server.url}/login?next={urllib.parse.quote(path)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif reply.fault == HTML:
                self._whole(reply, LOGIN_PAGE, "text/html; charset=utf-8")
            elif reply.fault == EMPTY:
                kind = "matrix" if path.endswith("query_range") else "vector"
                self._whole(reply, b'{"status":"success","data":{"resultType":"%s","result":[]}}'
                            % kind.encode(), "application/json")
            else:
                self._stream(reply, server.body(path.endswith("query_range")),
                             server.bytes_per_second)
        except OSError:  # the client hung up: a refused reply
            reply.hung_up = True
            self.close_connection = True
        finally:
            with server.lock:
                reply.done = True

    def _whole(self, reply: Reply, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        reply.written = len(body)

    def _stream(self, reply: Reply, chunks: list[bytes], bytes_per_second: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            reply.written += len(chunk)
            if bytes_per_second > 0:
                time.sleep(len(chunk) / bytes_per_second)  # the pace of a slow link
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean
