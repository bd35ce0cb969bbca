"""`dcr-reaper serve`: scheduled scans (and optional reaps) on APScheduler, with /metrics, /healthz, /readyz.

One replica leads: the one holding the database lock (S6). A standby keeps serving metrics with
dcr_leader 0 and tries the lock on every tick, so it takes over within one interval when the leader dies.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import make_wsgi_app
from sqlalchemy.pool import NullPool

from reaper.config import Config
from reaper.db import make_engine, parse_url
from reaper.errors import ReaperError
from reaper.lock import RunLock, lock_name
from reaper.metrics import ReaperMetrics
from reaper.report import classified, open_source

log = logging.getLogger("reaper.service")


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def log_event(event: str, **fields: Any) -> None:
    """One structured (JSON) log line."""
    log.info(json.dumps({"event": event, **fields}, default=str, sort_keys=True))


class Service:
    """The scheduled scanner; `start()` runs it in the background, `stop()` shuts it down within the grace."""

    def __init__(self, config: Config):
        if not config.database_url:
            raise ReaperError("database_url is not set")
        self.config = config
        self.s = config.service
        self.metrics = ReaperMetrics(self.s.top_families)
        self.stop_event = threading.Event()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.lock: RunLock | None = None
        self._lock_engine = make_engine(config.database_url, readonly=False)
        self._ping_engine = sa.create_engine(
            parse_url(config.database_url),
            poolclass=NullPool,
            connect_args=_connect_timeout(config.database_url, self.s.database_timeout),
        )
        self._last_error: str | None = None
        self._watermark: float | None = None
        self._at_watermark: dict[str, int] = {}  # per family: registrations seen exactly at the watermark
        self._busy = threading.Lock()
        self.httpd: WSGIServer | None = None

    # -- one tick ---------------------------------------------------------------------------------------

    def _ensure_leader(self) -> bool:
        if self.lock is not None:
            try:
                if self.lock.alive():
                    return True
            except Exception:  # noqa: BLE001 - a lock connection in any bad state is a lost lock
                pass
            log_event("leadership_lost")
            lock, self.lock = self.lock, None
            _discard(lock)
        lock = RunLock(self._lock_engine, lock_name(self._lock_engine, self.config.ledger.prefix))
        try:
            got = lock.try_acquire()
        except Exception:
            _discard(lock)  # connected but failed before the answer: close what it opened
            raise
        if got:
            self.lock = lock
            log_event("leadership_acquired")
            return True
        return False

    def tick(self) -> None:
        """Scan (and reap, when enabled) if this replica leads; never raises."""
        if self.stop_event.is_set() or not self._busy.acquire(blocking=False):
            return
        try:
            try:
                leader = self._ensure_leader()
            except Exception as exc:  # noqa: BLE001 - the database may be down; stay up and retry
                self.metrics.leader = 0
                self._fail("lock", exc)
                return
            self.metrics.leader = int(leader)
            if not leader:
                return
            self._scan()
            if self.s.reap and not self.stop_event.is_set() and self._last_error is None:
                self._reap()
        finally:
            self._busy.release()

    def _scan(self) -> None:
        started = time.time()
        try:
            source = open_source(self.config)
            try:
                with classified(
                    self.config, source, new_since=self._watermark, seen_at_watermark=self._at_watermark
                ) as (stream, snapshot):
                    for _ in stream:
                        if self.stop_event.is_set():
                            raise ReaperError("stopped during scan")
            finally:
                source.engine.dispose()
        except Exception as exc:  # noqa: BLE001
            self._fail("scan", exc)
            return
        first = self._watermark is None
        if snapshot.newest_registration and snapshot.newest_registration >= (self._watermark or 0.0):
            self._watermark = snapshot.newest_registration
            self._at_watermark = dict(snapshot.newest_by_family)
        elif self._watermark is None:
            self._watermark = started
        self.metrics.record_scan(snapshot, first)
        self._last_error = None
        log_event(
            "scan",
            clients=snapshot.clients,
            families=len(snapshot.families),
            by_verdict={str(k): v for k, v in snapshot.by_verdict.items()},
            new_registrations=snapshot.new_registrations if not first else None,
            problems=snapshot.problem_count,
            duration_seconds=round(snapshot.duration, 3),
        )

    def _reap(self) -> None:
        from reaper.reap import apply, plan

        try:
            the_plan = plan(self.config)
            if the_plan.cap_problem:
                log_event("reap_refused", reason=the_plan.cap_problem, planned=len(the_plan.candidates))
                return
            result = apply(self.config, the_plan, stop=self.stop_event, held_lock=self.lock)
        except Exception as exc:  # noqa: BLE001
            self._fail("reap", exc)
            return
        self.metrics.record_reaped(result.acted)
        log_event(
            "reap",
            run_id=result.run_id,
            planned=len(the_plan.candidates),
            acted=result.total_acted,
            skipped=sum(result.skipped.values()),
            restored_late=len(result.restored_late),
            stopped=result.stopped,
            duration_seconds=round(result.duration, 3),
        )

    def _fail(self, stage: str, exc: BaseException) -> None:
        self.metrics.record_failure()
        self._last_error = f"{stage}: {exc}"
        log_event(f"{stage}_failed", error=str(exc)[:500])

    # -- HTTP ------------------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Ready when the database answers and (as leader) the last scan succeeded recently."""
        try:
            with self._ping_engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001
            return False, f"database unreachable: {str(exc).splitlines()[0][:200]}"
        if not self.metrics.leader:
            return True, "standby: database answers"
        max_age = self.s.ready_max_age or 3 * self.s.scan_interval
        age = time.time() - self.metrics.last_success
        if self.metrics.last_success == 0:
            return False, "no successful scan yet"
        if age > max_age or self._last_error:
            return False, f"last successful scan {age:.0f}s ago; last error: {self._last_error}"
        return True, f"leader: last successful scan {age:.0f}s ago"

    def wsgi(self) -> Callable[..., Iterable[bytes]]:
        metrics_app = make_wsgi_app(self.metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            if path == "/readyz":
                ok, why = self.ready()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [why.encode() + b"\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; try /metrics, /healthz or /readyz\n"]

        return app

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.httpd = make_server(
            self.s.bind_address,
            self.s.port,
            self.wsgi(),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True).start()
        trigger = (
            CronTrigger.from_crontab(self.s.scan_cron, timezone="UTC")
            if self.s.scan_cron
            else IntervalTrigger(seconds=self.s.scan_interval)
        )
        self.scheduler.add_job(
            self.tick,
            trigger,
            id="tick",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=_now_dt(),
        )
        self.scheduler.start()
        log_event(
            "started",
            listen=f"{self.s.bind_address}:{self.port}",
            reap=self.s.reap,
            interval=self.s.scan_interval,
            cron=self.s.scan_cron,
        )

    @property
    def port(self) -> int:
        return self.httpd.server_address[1] if self.httpd else self.s.port

    def stop(self) -> bool:
        """Stop scheduling, let the current batch finish (up to the grace), release the lock. True if clean."""
        self.stop_event.set()
        self.scheduler.shutdown(wait=False)
        clean = self._busy.acquire(timeout=self.s.grace)
        if clean:
            self._busy.release()
        if self.lock is not None and clean:
            lock, self.lock = self.lock, None
            _discard(lock)
        # Not clean: a reap batch is still running in the scheduler's thread. Keep the lock (S6) so no other
        # replica starts acting meanwhile; it goes with the connection when the process exits.
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()  # shutdown() only stops the loop; this closes the listening socket
        self._lock_engine.dispose()
        self._ping_engine.dispose()
        log_event("stopped", clean=clean)
        return clean


def _discard(lock: RunLock) -> None:
    """Release a lock whose connection may be broken; never raises.

    RunLock.release() expects a DBAPIError from a dead connection, but a connection cut inside its transaction
    raises PendingRollbackError on the next statement; the server dropped the lock with the connection anyway,
    so closing is all that is left to do.
    """
    try:
        lock.release()
    except Exception:  # noqa: BLE001
        try:
            lock._close()  # noqa: SLF001
        except Exception:  # noqa: BLE001
            pass


def _now_dt() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _connect_timeout(url: str, seconds: float) -> dict[str, Any]:
    backend = parse_url(url).get_backend_name()
    if backend == "postgresql":
        return {"connect_timeout": max(1, int(seconds))}
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": max(1, int(seconds))}
    return {}


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; exit 0 after a clean stop."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # The service logs one JSON line per event; failures reach it as exceptions, not driver log records.
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    service = Service(config)
    done = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        log_event("signal", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    service.start()
    done.wait()
    service.stop()
    return 0
