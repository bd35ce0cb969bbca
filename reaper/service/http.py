"""The sidecar's HTTP side: /metrics, /healthz and /readyz on prometheus_client's WSGI server, bounded.

GET and HEAD only; at most `MAX_CONNECTIONS` are served at once (a connection beyond that is closed at once), each
connection may stay silent for `CONNECTION_TIMEOUT` seconds and lasts `CONNECTION_DEADLINE` seconds at most (a
request trickled in a byte at a time included), so idle or half-sent requests cannot pile up threads or keep the
health endpoints from answering for long.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
MAX_CONNECTIONS = 32
CONNECTION_TIMEOUT = 10.0  # seconds a connection may stay silent
CONNECTION_DEADLINE = 30.0  # seconds a connection may last at all
POLL_INTERVAL = 0.05  # how soon serve_forever() notices shutdown()


class BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most `max_connections` of them, none older than `deadline` seconds."""

    max_connections = MAX_CONNECTIONS
    deadline = CONNECTION_DEADLINE
    request_queue_size = 128  # the listen backlog (socketserver's default is 5)

    def __init__(self, *args: Any, **kwargs: Any):
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self._open: dict[socket.socket, float] = {}  # connection -> when it must be gone (time.monotonic())
        self._open_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._enforce_deadlines, name="http-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: drop the connection rather than queue it
            return
        with self._open_lock:
            self._open[request] = time.monotonic() + self.deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._open_lock:
            known = self._open.pop(request, None) is not None
        if known:
            self.slots.release()

    def _enforce_deadlines(self) -> None:
        """Shut down connections past their deadline: the thread serving one returns at once."""
        while not self._closed.wait(min(1.0, self.deadline / 4)):
            now = time.monotonic()
            with self._open_lock:
                late = [conn for conn, until in self._open.items() if until <= now]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went silent, hung up or was cut at its deadline is not worth a traceback on stderr."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()


class Handler(_SilentHandler):
    """prometheus_client's quiet handler, with a per-connection socket timeout."""

    timeout = CONNECTION_TIMEOUT


def _text(
    start_response: Callable[..., Any], status: str, body: str, extra: tuple[tuple[str, str], ...] = ()
) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *extra])
    return [body.encode() + b"\n"]


def application(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> WSGIApp:
    """The WSGI app: metrics from `registry`, liveness, and readiness from `ready()`."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", "GET or HEAD only", (("Allow", "GET, HEAD"),))
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            ok, why = ready()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", why)
        return _text(start_response, "404 Not Found", "not found; try /metrics, /healthz or /readyz")

    return app


def serve_http(
    address: str,
    port: int,
    app: WSGIApp,
    *,
    max_connections: int = MAX_CONNECTIONS,
    timeout: float = CONNECTION_TIMEOUT,
    deadline: float = CONNECTION_DEADLINE,
) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Listen on address:port (IPv4 or IPv6) and serve in a daemon thread."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]

    class Server(BoundedServer):
        address_family = family

    Server.max_connections, Server.deadline = max_connections, deadline

    class ConnectionHandler(Handler):
        pass

    ConnectionHandler.timeout = timeout
    httpd = make_server(str(sockaddr[0]), port, app, Server, handler_class=ConnectionHandler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, name="http", daemon=True
    )
    thread.start()
    return httpd, thread
