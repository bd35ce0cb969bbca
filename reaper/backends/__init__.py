"""Backends: one per kind of store, behind one seam (`base`); `open_backend` picks one from the profile."""

from reaper.backends.base import Actor, Backend, BatchOutcome, Candidate, RunLock
from reaper.backends.factory import open_backend
from reaper.db import abort_connections


def interrupt_all() -> int:
    """Cut every database connection this process has open (a signal's last resort): a call waiting on one
    fails at once. Returns how many were cut."""
    return abort_connections()


__all__ = ["Actor", "Backend", "BatchOutcome", "Candidate", "RunLock", "interrupt_all", "open_backend"]
