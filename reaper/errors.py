"""Error hierarchy: each error knows its exit code and prints as one line."""


class ReaperError(Exception):
    """A failure the user can act on; printed as one line, no traceback."""

    exit_code = 1


class ConfigError(ReaperError):
    """Bad configuration, bad flags, unknown profile (exit 2)."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class SchemaError(ReaperError):
    """The profile does not match the database schema (exit 3)."""

    exit_code = 3

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DatabaseError(ReaperError):
    """The database could not be reached or refused a statement (exit 1)."""

    exit_code = 1
