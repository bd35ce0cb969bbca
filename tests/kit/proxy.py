"""A TCP proxy the test controls, in front of a database: refuse new connections, cut the open ones, cut one in
the middle of a big result, or black-hole everything (stop forwarding, keep every socket open: a partition, or a
middlebox that hangs) until healed."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import sqlalchemy as sa


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.down_bytes = 0  # server -> client

    def shut(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FaultProxy:
    """127.0.0.1:<random> -> target. refuse()/accept() new connections, cut() every open one, or arm a cut
    that fires once one connection has carried `n` bytes from the server (in the middle of a big result).

    blackhole() stops forwarding in both directions on every connection, open or new, and keeps every socket
    open: neither end sees a close or a reset, and TCP keepalives are answered by the proxy's own kernel. heal()
    forwards again (what was sent meanwhile, closes included). arm_blackhole_after(n) black-holes once one
    connection has carried `n` bytes from the server."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.largest_download = 0  # most bytes one finished connection carried from the server
        self.holding = False  # black-holed: nothing is forwarded
        self.held_at: float | None = None  # time.monotonic() when the black hole began
        self._cut_after: int | None = None
        self._hole_after: int | None = None
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    # controls
    def refuse(self) -> None:
        self.refusing = True

    def accept(self) -> None:
        self.refusing = False

    def cut(self) -> int:
        """Shut every open connection (both sides); returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
            self.cuts += 1
        for p in pairs:
            p.shut()
        return len(pairs)

    def arm_cut_after(self, n_bytes: int) -> None:
        self._cut_after = n_bytes

    def blackhole(self) -> None:
        """Stop forwarding anything, on every connection, and keep every socket open."""
        self.held_at = time.monotonic()
        self.holding = True

    def heal(self) -> None:
        self.holding = False

    def arm_blackhole_after(self, n_bytes: int) -> None:
        self._hole_after = n_bytes

    @property
    def hole_armed(self) -> bool:
        return self._hole_after is not None

    @property
    def armed(self) -> bool:
        return self._cut_after is not None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # machinery
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: the client sees the connection reset at once
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            t = threading.Thread(target=self._pump, args=(pair,), name="proxy-pump", daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, pair: _Pair) -> None:
        sel = selectors.DefaultSelector()
        sel.register(pair.client, selectors.EVENT_READ, pair.upstream)
        sel.register(pair.upstream, selectors.EVENT_READ, pair.client)
        try:
            while not self._closing.is_set():
                if self.holding:  # unread data waits in the kernel's buffers; the sender's window closes
                    time.sleep(0.02)
                    continue
                for key, _ in sel.select(timeout=0.1):
                    if self.holding:
                        break
                    src, dst = key.fileobj, key.data
                    data = src.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    dst.sendall(data)
                    if src is pair.upstream:
                        pair.down_bytes += len(data)
                        limit = self._cut_after
                        if limit is not None and pair.down_bytes >= limit:
                            self._cut_after = None
                            self.cut()
                            return
                        hole = self._hole_after
                        if hole is not None and pair.down_bytes >= hole:
                            self._hole_after = None
                            self.blackhole()
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._pairs.discard(pair)
                self.largest_download = max(self.largest_download, pair.down_bytes)
            pair.shut()
            pair.client.close()
            pair.upstream.close()

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self.listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pg_port_of(url: str) -> tuple[str, int]:
    u = sa.engine.make_url(url)
    return (u.host or "127.0.0.1", u.port or 5432)


def via_proxy(url: str, proxy: FaultProxy) -> str:
    u = sa.engine.make_url(url).set(host="127.0.0.1", port=proxy.port)
    return u.render_as_string(hide_password=False)
