"""The sidecar's HTTP server is bounded, and its readiness is honest.

HTTP: GET and HEAD only; idle or half-sent connections hold at most `max_connections` threads, each for at most
the per-connection timeout (silence) or deadline (a request trickled a byte at a time); stopping is prompt.
Readiness: 503 until the run lock has been tried once, and 503 with the reason whenever it cannot be checked.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kit.cli import http_get, poll
from reaper.config import load_config
from reaper.demo import build_demo
from reaper.errors import DatabaseError
from reaper.service import Service
from reaper.service.http import application, serve_http


def _request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def server() -> Iterator[tuple[int, Any]]:
    app = application(CollectorRegistry(), lambda: (True, "fine"))
    httpd, thread = serve_http("127.0.0.1", 0, app, max_connections=8, timeout=1.0, deadline=3.0)
    try:
        yield int(httpd.server_address[1]), httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH", "OPTIONS"])
def test_only_get_and_head(server, method, path):
    port, _ = server
    status, headers, body = _request(port, method, path)
    assert status == 405 and headers["Allow"] == "GET, HEAD" and body == b"GET or HEAD only\n"


def test_get_and_head_answer(server):
    port, _ = server
    assert _request(port, "GET", "/healthz")[::2] == (200, b"ok\n")
    assert _request(port, "GET", "/readyz")[::2] == (200, b"fine\n")
    status, _, body = _request(port, "HEAD", "/healthz")
    assert status == 200 and body == b""


def _handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def _half_sent(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    return s


@pytest.mark.slow
def test_half_sent_requests_hold_a_bounded_number_of_threads_for_a_bounded_time(server, capfd):
    port, _ = server
    idle = [_half_sent(port) for _ in range(200)]
    opened = time.monotonic()
    try:
        most = 0
        while time.monotonic() - opened < 0.8:  # within the 1 s timeout: the first ones are all still held
            most = max(most, _handler_threads())
            time.sleep(0.01)
        print(f"200 half-sent requests: at most {most} handler threads")
        assert 0 < most <= 8, "a thread per connection beyond max_connections"
        # Once the silent ones time out (1 s), the health endpoint answers again.
        poll(lambda: _try_health(port), 5, "/healthz to answer again", interval=0.05)
        recovered = time.monotonic() - opened
        print(f"/healthz answered again {recovered:.2f}s after they were opened")
        assert recovered < 2.5
    finally:
        for s in idle:
            s.close()
    poll(lambda: _handler_threads() == 0, 5, "the handler threads to end")
    assert "Traceback" not in capfd.readouterr().err, "a silent client is not worth a traceback"


def _try_health(port: int) -> bool:
    try:
        return http_get(port, "/healthz", timeout=1.0) == (200, "ok\n")
    except OSError:
        return False


@pytest.mark.slow
def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_deadline(server):
    port, _ = server
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    try:
        closed_after = None
        line = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100
        for byte in line:  # one byte every 0.4 s: never silent for the 1 s timeout
            try:
                s.sendall(bytes([byte]))
                s.settimeout(0.4)
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - t0
                break
    finally:
        s.close()
    print(f"trickled request cut after {closed_after}s (deadline 3 s)")
    assert closed_after is not None and 2.5 < closed_after < 4.5


def test_stop_is_prompt():
    app = application(CollectorRegistry(), lambda: (True, "fine"))
    httpd, thread = serve_http("127.0.0.1", 0, app)
    time.sleep(0.2)
    t0 = time.monotonic()
    httpd.shutdown()
    took = time.monotonic() - t0
    httpd.server_close()
    thread.join(timeout=5)
    print(f"shutdown took {took * 1000:.0f} ms")
    assert took < 0.25


# --- readiness ----------------------------------------------------------------------------------------------


def _service(tmp_path, **service: object) -> Service:
    db = build_demo(tmp_path / "demo.sqlite")
    settings = {"port": 0, "bind_address": "127.0.0.1", "scan_interval": 3600, **service}
    config = load_config(
        None, {"database_url": f"sqlite:///{db}", "profile": "mcp-memory-service", "service": settings}, environ={}
    )
    return Service(config)


def test_not_ready_before_the_first_attempt_on_the_lock(tmp_path):
    service = _service(tmp_path)
    try:
        assert service.ready() == (False, "starting: the run lock has not been tried yet")
        service.tick()
        ok, why = service.ready()
        assert ok and why.startswith("leader: last successful scan"), why
    finally:
        if service.lock is not None:
            service.lock.discard()
        service.backend.close()


def test_a_lock_that_cannot_be_checked_is_not_ready_and_says_why(tmp_path, monkeypatch):
    service = _service(tmp_path)

    def broken_lock() -> Any:
        raise DatabaseError("cannot reach the lock's database: timeout")

    monkeypatch.setattr(service.backend, "lock", broken_lock)
    try:
        service.tick()
        assert service.ready() == (False, "the run lock cannot be checked: cannot reach the lock's database: timeout")
        assert service.metrics.leader == 0 and service.metrics.last_success == 0
    finally:
        service.backend.close()


def test_a_leader_that_cannot_confirm_its_lock_steps_down_between_ticks(tmp_path):
    service = _service(tmp_path)
    try:
        service.tick()
        assert service.metrics.leader == 1 and service.lock is not None
        service.lock.alive = lambda: False  # type: ignore[method-assign]
        service.watch_lock()
        assert service.metrics.leader == 0
        ok, why = service.ready()
        assert not ok and why.startswith("lost the run lock"), why
        service.tick()  # drops it and competes again
        assert service.metrics.leader == 1 and service.ready()[0]
    finally:
        if service.lock is not None:
            service.lock.discard()
        service.backend.close()
