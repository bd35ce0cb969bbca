"""Backends: one per kind of store, behind one seam (`base`); `open_backend` picks one from the profile."""

from reaper.backends.base import Actor, Backend, BatchOutcome, Candidate, RunLock
from reaper.backends.factory import open_backend

__all__ = ["Actor", "Backend", "BatchOutcome", "Candidate", "RunLock", "open_backend"]
