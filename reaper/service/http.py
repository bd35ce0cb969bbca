"""The sidecar's HTTP side: /metrics, /healthz and /readyz on prometheus_client's WSGI server, bounded.

GET and HEAD only; each connection has a socket timeout, and at most `MAX_CONNECTIONS` are served at once (a
connection beyond that is closed at once), so idle or half-sent requests cannot pile up threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
MAX_CONNECTIONS = 32
CONNECTION_TIMEOUT = 10.0  # seconds a connection may stay silent


class BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: drop the connection rather than queue it
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


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


def serve_http(address: str, port: int, app: WSGIApp) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Listen on address:port (IPv4 or IPv6) and serve in a daemon thread."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]

    class Server(BoundedServer):
        address_family = family

    httpd = make_server(str(sockaddr[0]), port, app, Server, handler_class=Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    return httpd, thread
