"""Reaping: the plan a policy makes, and the runner that applies it (or restores it) through any backend."""

from reaper.reaping.plan import Plan, RunResult, check_actions, choose
from reaper.reaping.restore import RestoreResult, restore_from_ledger
from reaper.reaping.runner import apply, holding, pause

__all__ = [
    "Plan",
    "RestoreResult",
    "RunResult",
    "apply",
    "check_actions",
    "choose",
    "holding",
    "pause",
    "restore_from_ledger",
]
