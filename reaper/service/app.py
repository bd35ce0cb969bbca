"""`dcr-reaper serve`: scheduled scans (and optional reaps) on APScheduler, with /metrics, /healthz, /readyz.

One replica leads: the one holding the store's run lock (S6). A standby keeps serving metrics with dcr_leader 0
and tries the lock on every tick, so it takes over within one interval when the leader dies.

The leader checks its lock between ticks as well (every third of a lock check-in, or each interval if shorter):
a lock it can no longer confirm makes it step down at once (dcr_leader 0, /readyz 503 with the reason), well
before the database can free the lock for another replica; the next tick drops that lock session (ending it,
if the database still holds it for us) and competes again. /readyz says 503 until the lock has been tried once,
and whenever it cannot be checked.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from reaper import commands
from reaper.analysis.incremental import ClientState
from reaper.backends import Backend, RunLock, open_backend
from reaper.config import Config
from reaper.errors import ConfigError, LockUnavailable
from reaper.reaping.evidence import EvidenceCollector
from reaper.service.http import application, serve_http
from reaper.service.metrics import ReaperMetrics

log = logging.getLogger("reaper.service")


def log_event(event: str, **fields: Any) -> None:
    """One structured (JSON) log line."""
    log.info(json.dumps({"event": event, **fields}, default=str, sort_keys=True))


class Service:
    """The scheduled scanner; `start()` runs it in the background, `stop()` shuts it down within the grace."""

    def __init__(self, config: Config, backend: Backend | None = None):
        self.config = config
        self.s = config.service
        self.backend = backend or open_backend(config)
        self.metrics = ReaperMetrics(self.s.top_families, config.loops.lookback)
        self.stop_event = threading.Event()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.lock: RunLock | None = None
        self._lock_tried = False  # readiness: not before the first attempt on the lock
        self._lock_problem: str | None = None  # why the lock cannot be checked (or was lost), when it cannot
        self._unlocked: str | None = None  # leading without a run lock, and why (reading only: see _ensure_leader)
        self._phase: str | None = None  # "scan" or "reap" while a tick is in one
        self._last_error: str | None = None
        self._watermark: float | None = None
        self._at_watermark: dict[str, int] = {}  # per family: registrations seen exactly at the watermark
        self._state: ClientState | None = None  # the last scan's clients, for incremental ticks
        self._since_full = 0  # ticks since the last full scan
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
            self.metrics.leader = 0  # at once: competing again may take a while on a bad network
            lock, self.lock = self.lock, None
            lock.discard()
        lock = self.backend.lock()
        try:
            got = lock.try_acquire()
        except LockUnavailable as exc:
            lock.discard()
            if self.s.reap:
                raise
            # Reading only, and the lock cannot be taken at all (SQLite in a directory this replica cannot write,
            # no database.sqlite_lock_dir): scanning needs no lock, so lead without one rather than never scan.
            if self._unlocked is None:
                log_event("leadership_unlocked", reason=str(exc))
            self._unlocked = str(exc)
            return True
        except Exception:
            lock.discard()  # connected but failed before the answer: close what it opened
            raise
        self._unlocked = None
        if got:
            self.lock = lock
            log_event("leadership_acquired")
            return True
        return False

    def watch_lock(self) -> None:
        """Between ticks: a leader that can no longer confirm its lock steps down now; the next tick competes."""
        lock = self.lock
        if lock is None or self.stop_event.is_set():
            return
        try:
            held = lock.alive()
        except Exception:  # noqa: BLE001 - cannot confirm it: as good as lost
            held = False
        if not held and self.lock is lock:
            self.metrics.leader = 0
            self._lock_problem = "lost the run lock (it cannot be confirmed); competing for it again on the next tick"

    def tick(self) -> None:
        """Scan (and reap, when enabled) if this replica leads; never raises."""
        if self.stop_event.is_set() or not self._busy.acquire(blocking=False):
            return
        try:
            try:
                leader = self._ensure_leader()
            except Exception as exc:  # noqa: BLE001 - the database may be down; stay up and retry
                self.metrics.leader = 0
                self._lock_problem = f"the run lock cannot be checked: {_first_line(exc)}"
                self._fail("lock", exc)
                return
            finally:
                self._lock_tried = True
            self._lock_problem = None
            self.metrics.leader = int(leader)
            if not leader:
                return
            self._scan()
            if self.s.reap and not self.stop_event.is_set() and self._last_error is None:
                self._reap()
        finally:
            self.backend.close()  # no idle connections to the auth database between ticks (the lock keeps its own)
            self._busy.release()

    def _scan(self) -> None:
        started = time.time()
        self._phase = "scan"
        # Every service.full_scan_every-th tick scans fully, whatever the state: the safety net for changes the
        # profile's columns cannot show (docs/deployment.md).
        state, self._state = self._state, None  # a failed tick leaves no state behind
        if self._since_full + 1 >= self.s.full_scan_every:
            state = None
        try:
            snapshot, self._state = commands.tick(
                self.config,
                state,
                self.backend,
                new_since=self._watermark,
                seen_at_watermark=self._at_watermark,
                stop=self.stop_event,
            )
        except Exception as exc:  # noqa: BLE001
            self._fail("scan", exc)
            return
        finally:
            self._phase = None
        incremental = state is not None and self._state is state
        self._since_full = self._since_full + 1 if incremental else 0
        first = self._watermark is None
        if snapshot.newest_registration and snapshot.newest_registration >= (self._watermark or 0.0):
            self._watermark = snapshot.newest_registration
            self._at_watermark = dict(snapshot.newest_by_family)
        elif self._watermark is None:
            self._watermark = started
        self.metrics.record_scan(snapshot, first)
        if first and self.s.reap:
            self._remember_kept_loops(snapshot.started_at)
        self._last_error = None
        kept = self._state if incremental else None  # what the tick re-read, judged alone and judged again
        log_event(
            "scan",
            clients=snapshot.clients,
            families=len(snapshot.families),
            by_verdict={str(k): v for k, v in snapshot.by_verdict.items()},
            new_registrations=snapshot.new_registrations if not first else None,
            incremental=incremental,
            reread=kept.reread if kept else None,
            judged_alone=kept.judged_alone if kept else None,
            rejudged=kept.rejudged if kept else None,
            problems=snapshot.problem_count,
            duration_seconds=round(snapshot.duration, 3),
        )

    def _remember_kept_loops(self, now: float) -> None:
        """Loops a reap before this process removed from the database still count for loops.lookback: read
        them from the evidence the runs kept (only when this service reaps: the ledger is then its own)."""
        try:
            kept = commands.kept_loops(self.config, now - self.config.loops.lookback, self.backend)
        except Exception as exc:  # noqa: BLE001 - a metric's memory is not worth a failed tick
            log.warning("could not read the loops kept in the ledger: %s", _first_line(exc))
            return
        self.metrics.remember_loops(kept, now)

    def _reap(self) -> None:
        try:
            self._phase = "scan"  # planning is a scan: a stop may cut it
            evidence = EvidenceCollector()  # kept with the run, as the CLI's reaps keep it
            the_plan = commands.plan(self.config, self.backend, evidence=evidence)
            if the_plan.cap_problem:
                log_event("reap_refused", reason=the_plan.cap_problem, planned=len(the_plan.candidates))
                return
            self._phase = "reap"  # acting: a stop lets the batch finish, within the grace
            result = commands.apply(
                self.config,
                the_plan,
                stop=self.stop_event,
                held_lock=self.lock,
                backend=self.backend,
                evidence=evidence,
            )
        except Exception as exc:  # noqa: BLE001
            self._fail("reap", exc)
            return
        finally:
            self._phase = None
        self.metrics.record_reaped(result.acted)
        if result.total_acted:
            self._state = None  # what the reap changed is not stamped in the store: the next tick scans fully
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
        """Ready when the lock has been tried and can be checked, the database answers, and (as leader) the last
        scan succeeded recently."""
        if not self._lock_tried:
            return False, "starting: the run lock has not been tried yet"
        try:
            self.backend.ping()
        except Exception as exc:  # noqa: BLE001
            return False, f"database unreachable: {_first_line(exc)}"
        if self._lock_problem:
            return False, self._lock_problem
        if not self.metrics.leader:
            return True, "standby: database answers"
        max_age = self.s.ready_max_age or 3 * self.s.scan_interval
        age = time.time() - self.metrics.last_success
        if self.metrics.last_success == 0:
            return False, "no successful scan yet"
        if age > max_age or self._last_error:
            return False, f"last successful scan {age:.0f}s ago; last error: {self._last_error}"
        role = "leader" if self._unlocked is None else f"leader without a run lock ({self._unlocked})"
        return True, f"{role}: last successful scan {age:.0f}s ago"

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.httpd, _ = serve_http(self.s.bind_address, self.s.port, application(self.metrics.registry, self.ready))
        except OSError as exc:  # a busy port, an address this host does not have
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"service.bind_address / service.port: cannot listen on {self.s.bind_address}:{self.s.port}: {reason}"
            ) from None
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
            next_run_time=datetime.now(UTC),
        )
        # A lock check-in is a third of database.stranded_after (the database frees a silent lock session after
        # it): checking three times per check-in steps a partitioned leader down well before that.
        every = self.config.database.stranded_after / 9
        if not self.s.scan_cron:
            every = min(every, self.s.scan_interval)
        self.scheduler.add_job(
            self.watch_lock, IntervalTrigger(seconds=every), id="lock-watch", max_instances=1, coalesce=True
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
        return int(self.httpd.server_address[1]) if self.httpd else self.s.port

    def stop(self) -> bool:
        """Stop scheduling, let the current batch finish (up to the grace), release the lock. True if clean."""
        self.stop_event.set()
        if self.scheduler.running:  # a service driven tick by tick (never started) has nothing scheduled
            self.scheduler.shutdown(wait=False)
        if self._phase == "scan":
            # Nothing of a scan is worth finishing: cut its connections, so one waiting on a silent network ends
            # now instead of at its timeout. (A reap batch is left to finish within the grace.)
            self.backend.interrupt()
        clean = self._busy.acquire(timeout=self.s.grace)
        if clean:
            self._busy.release()
        if self.lock is not None and clean:
            lock, self.lock = self.lock, None
            lock.discard()
        # Not clean: a reap batch is still running in the scheduler's thread. Keep the lock (S6) so no other
        # replica starts acting meanwhile; it goes with the connection when the process exits.
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()  # shutdown() only stops the loop; this closes the listening socket
        if clean:
            self.backend.close()
        log_event("stopped", clean=clean)
        return clean


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else repr(exc)


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
