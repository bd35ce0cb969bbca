"""The backend seam: everything that touches an auth server's store goes through these protocols.

A Backend scans (read-only), gives the run lock and the ledger, and opens an Actor that acts on one batch at a
time (re-checking liveness at the store right before it acts), sweeps for late credentials and restores. The
runner (`reaper.reaping`) owns everything else, once for every backend: caps, runs, stop and lock-lost checks,
pauses, the late-token sweep. Nothing above this seam assumes SQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from reaper.analysis.pipeline import ScanSource
from reaper.ledger import Ledger, Tombstone
from reaper.profiles import BoundProfile


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing `check` found: an error (the profile cannot work), a warning (a decision for the operator) or
    information (what was resolved)."""

    level: Literal["error", "warning", "info"]
    code: str  # stable, for scripts: schema, encoding, unmapped_table, index, refresh_lifetime, clock, ledger, ...
    message: str
    fix: str = ""  # the exact change that resolves it, where there is one


def errors(findings: Sequence[Finding]) -> list[str]:
    return [f.message for f in findings if f.level == "error"]


@dataclass(slots=True)
class Candidate:
    """A client the policy would act on."""

    key: str
    client_id: str
    name: str | None
    family: str
    verdict: str
    reason: str
    action: str
    created_at: float | None
    canonical: str | None = None
    canonical_key: str | None = None
    last_used: float | None = None  # the newest credential's issue time, as the scan saw it
    disabled: bool = False


@dataclass
class BatchOutcome:
    """What one batch did: the clients acted on, and why the others were skipped."""

    done: list[Candidate] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


class RunLock(Protocol):
    """One actor at a time (S6): held for a whole run, released when the holder dies."""

    name: str

    def try_acquire(self) -> bool: ...

    def alive(self) -> bool:
        """Still held (checked between batches)."""
        ...

    def release(self) -> None: ...

    def discard(self) -> None:
        """Release a lock whose connection may be broken; never raises."""
        ...

    def holder(self) -> str:
        """Who holds the lock now, as far as the store can tell."""
        ...


class Actor(Protocol):
    """A read-write session on the store for one reap or restore."""

    ledger: Ledger
    batches_at_once: int  # how many batches the store can take at once, each in its own transaction

    def recover(self) -> int:
        """Reconcile tombstones left `pending` by a crash; return how many."""
        ...

    def act(self, batch: Sequence[Candidate], run_id: str) -> BatchOutcome:
        """Act on one batch, each client re-checked at the store right before (S2), tombstoned (S5)."""
        ...

    def live_now(self, keys: Sequence[str]) -> list[str]:
        """Of these reaped client keys, those a credential issued after the act now references."""
        ...

    def restore(self, tombs: Sequence[Tombstone]) -> int:
        """Put clients back from their tombstones and record it in the ledger; return rows restored."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """One auth server's store, as the reaper sees it."""

    profile: BoundProfile
    description: str  # for reports and messages: never a password

    def check(self, deep: bool = False) -> list[Finding]:
        """The preflight: every mismatch between the profile and the store (errors). Resolves what the live store
        settles (column spellings, optional tables). With `deep` (the `check` command), also what the operator
        must decide (warnings) and where the ledger lives."""
        ...

    def scan(self, now: float | None = None) -> AbstractContextManager[ScanSource]:
        """A read-only scan (S1), judged at `now` (default: the store's own clock, S9)."""
        ...

    def now(self) -> float:
        """The store's clock, epoch seconds (S9)."""
        ...

    def lock(self) -> RunLock: ...

    def ledger(self) -> Ledger: ...

    def actor(self) -> Actor: ...

    def statements(self, batch: Sequence[Candidate]) -> list[str]:
        """What acting on this batch would run, for review; connects read-only at most."""
        ...

    def interrupt(self) -> None:
        """Cut the store's open connections (not the run lock's), from any thread: a call waiting on one fails
        at once. A stop request in the middle of a scan."""
        ...

    def ping(self) -> None:
        """Raise when the store does not answer (readiness)."""
        ...

    def close(self) -> None: ...
