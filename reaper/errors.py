"""Error hierarchy: each error knows its exit code and prints as one line (docs: README, exit codes)."""


class ReaperError(Exception):
    """A failure the user can act on; printed as one line, no traceback (exit 1)."""

    exit_code = 1

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class ConfigError(ReaperError):
    """Bad configuration, bad flags, unknown profile (exit 2)."""

    exit_code = 2


class SchemaError(ReaperError):
    """The profile does not match the database schema (exit 3)."""

    exit_code = 3


class DatabaseError(ReaperError):
    """The database could not be reached or refused a statement (exit 1)."""


class LockUnavailable(DatabaseError):
    """The run lock cannot be taken at all (SQLite: its lock file cannot be created); exit 1."""


class LockHeld(ReaperError):
    """Another reaper holds the lock; this one does nothing (exit 4)."""

    exit_code = 4


class CapExceeded(ReaperError):
    """The plan exceeds max_per_run or max_fraction: nothing was reaped (exit 5)."""

    exit_code = 5


class ClockSkew(ReaperError):
    """The reaper's clock and the store's disagree by more than classify.clock_skew: nothing acted on (exit 6)."""

    exit_code = 6


class RestoreConflict(ReaperError):
    """A row to restore already exists (exit 1): nothing was restored."""


class ApiError(ReaperError):
    """A server's admin API refused or failed (exit 1)."""


class Interrupted(ReaperError):
    """The operator interrupted a run (Ctrl-C): what was done is recorded and restorable (exit 130)."""

    exit_code = 130
