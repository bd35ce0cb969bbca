"""Command line: a thin shell over `reaper.commands`. Errors print one line; --debug shows the traceback.

SIGINT and SIGTERM end any command within seconds, even one waiting on a silent network: the command runs in a
worker thread; on the signal, an acting reap is asked to stop between batches (its batch in flight gets
`STOP_GRACE` seconds), then every database connection of the process is cut, which makes a blocked call fail at
once; the command unwinds (a partial output file is removed) and the process exits 128 + the signal's number
with one line. A second signal, or a command that has not unwound after `UNWIND` seconds, exits at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click

from reaper import __version__, commands
from reaper.analysis.model import VERDICTS, FamilyStats
from reaper.backends import interrupt_all
from reaper.config import Config, load_config, parse_duration, with_overrides
from reaper.errors import CapExceeded, ConfigError, ReaperError, RestoreConflict, SchemaError

EXIT_CODES = (
    "Exit codes: 0 ok, 1 runtime or database error, 2 usage or configuration error, 3 schema mismatch, "
    "4 another reaper holds the lock, 5 the circuit breaker stopped the plan (nothing reaped), "
    "6 the reaper's clock and the database's disagree (nothing acted on), "
    "7 `check`: the profile matches, with warnings to decide on, "
    "130/143 interrupted by SIGINT/SIGTERM."
)
CHECK_WARNINGS = 7
ERROR = "dcr-reaper: error: "
ROOT_CONFIG = "dcr_reaper.config_path"  # --config given before the subcommand
REPORT_FORMATS = ("table", "json", "csv", "markdown", "html")
FORMAT_OF_SUFFIX = {
    ".json": "json",
    ".csv": "csv",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".txt": "table",
}
STOP_GRACE = 2.0  # seconds a reap batch in flight gets to finish after SIGINT/SIGTERM
UNWIND = 3.0  # seconds a command gets to unwind once its connections are cut
T = TypeVar("T")

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_partial_outputs: set[str] = set()  # temporary output files not yet renamed into place


class Interrupted(ReaperError):
    """SIGINT or SIGTERM ended the command (exit 128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class Stop:
    """What a command's body sees of a stop request: `requested` is set on SIGINT/SIGTERM; a body that acts on
    the store sets `acting`, so that its batch in flight may finish before the connections are cut."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.acting = False


def _leave_now(signum: int) -> NoReturn:
    """Exit without waiting for the command: remove partial output files first, say why in one line."""
    for path in list(_partial_outputs):
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{ERROR}interrupted by {signal.Signals(signum).name}\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def stoppable(body: Callable[[Stop], T]) -> T:
    """Run `body` so that SIGINT and SIGTERM end it within seconds (see the module's docstring)."""
    if threading.current_thread() is not threading.main_thread():
        return body(Stop())  # signals are the main thread's: nothing to arrange
    stop = Stop()
    received: list[int] = []
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = body(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc
        finally:
            done.set()

    def on_signal(signum: int, _frame: Any) -> None:
        if received:
            _leave_now(received[0])  # a second signal: no more waiting
        received.append(signum)
        stop.requested.set()
        if stop.acting:
            with contextlib.suppress(Exception):
                sys.stderr.write("\ndcr-reaper: stopping after this batch (Ctrl-C again to interrupt at once)\n")
                sys.stderr.flush()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Thread(target=work, name="command", daemon=True).start()
        while not done.wait(0.05) and not received:
            pass
        if received and not done.is_set():
            if stop.acting:
                done.wait(STOP_GRACE)  # the runner stops between batches
            if not done.is_set():
                interrupt_all()  # a call waiting on a database fails now
            if not done.wait(UNWIND):
                _leave_now(received[0])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def output_file(path: str) -> Iterator[IO[str]]:
    """Where a command writes: stdout for `-`; otherwise a temporary file beside `path`, renamed over it only
    once complete, so a failure or a signal never leaves a partial file (nor touches an existing one)."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    try:
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_UMASK
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"--output {path}: {exc.strerror or exc}") from None
    _partial_outputs.add(tmp)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _partial_outputs.discard(tmp)


def hoist_debug(argv: list[str]) -> list[str]:
    """`--debug` anywhere before a `--` is the root's flag: `dcr-reaper report --debug` works as
    `dcr-reaper --debug report` does."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *(a for i, a in enumerate(argv) if i >= end or a != "--debug")]


class ReaperGroup(click.Group):
    """The root command: every failure becomes one line on stderr and its documented exit code."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        argv = hoist_debug(list(sys.argv[1:] if args is None else args))
        debug = argv[:1] == ["--debug"]
        if not debug:
            # SQLAlchemy logs some errors (e.g. closing a cursor after `| head`) with a traceback through
            # logging's last-resort handler; the CLI speaks in one-line errors, so keep its logs quiet.
            logging.getLogger("sqlalchemy").addHandler(logging.NullHandler())
        try:
            super().main(args=argv, prog_name=prog_name or "dcr-reaper", standalone_mode=False, **extra)
        except ReaperError as exc:
            self._fail(exc.problems, exc.exit_code, debug)
        except click.exceptions.Abort:
            self._fail(["aborted"], 130, False, prefix="dcr-reaper: ")
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            self._fail([exc.format_message() + hint], exc.exit_code, False)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            # `dcr-reaper report | head`: the reader left; exit quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, never a secret-bearing traceback
            self._fail([f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)"], 1, debug)
        sys.exit(0)

    @staticmethod
    def _fail(lines: list[str], code: int, debug: bool, prefix: str = ERROR) -> NoReturn:
        if debug:
            traceback.print_exc()
        for line in lines:
            click.echo(f"{prefix}{line}", err=True)
        sys.exit(code)


class Progress:
    """Progress on stderr: one line redrawn on a terminal; elsewhere (a log, a pipe) a line every `every`
    seconds. Enabled on a terminal unless told otherwise."""

    def __init__(self, label: str, enabled: bool | None = None, every: float = 5.0):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.enabled = self.tty if enabled is None else enabled
        self.every = 0.2 if self.tty else every
        self.last = 0.0
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and 0 < done < total):
            return
        self.last = now
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = f", about {_eta((total - done) / rate)} left" if rate > 0 and 0 < done < total else ""
        line = f"{self.label}: {done:,}/{total:,} clients{pct}, {rate:,.0f}/s{eta}"
        if self.tty:
            sys.stderr.write(f"\r{line} \x1b[K" + ("\n" if done >= total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _pairs(items: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


def source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --database-url, --profile, --table and --option, shared by every command that reads a store."""

    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar=None,
        help="TOML config file (default: $DCR_REAPER_CONFIG, ./dcr-reaper.toml, /etc/dcr-reaper/config.toml).",
    )
    @click.option("--database-url", help="Auth server database URL (env DCR_REAPER_DATABASE_URL).")
    @click.option(
        "--scan-database-url",
        help="A streaming replica of it for the scan; the reap acts on --database-url (env "
        "DCR_REAPER_SCAN_DATABASE_URL).",
    )
    @click.option("--profile", help="Built-in profile name or path to a profile .toml (env DCR_REAPER_PROFILE).")
    @click.option(
        "--table",
        "tables",
        multiple=True,
        metavar="NAME=PHYSICAL",
        help="Rename a profile table, e.g. --table oauth2_client=client (repeatable).",
    )
    @click.option(
        "--option",
        "options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Set a profile option, e.g. --option refresh_lifetime=30d (repeatable).",
    )
    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        config_path: str | None,
        database_url: str | None,
        scan_database_url: str | None,
        profile: str | None,
        tables: tuple[str, ...],
        options: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        root = click.get_current_context().meta.get(ROOT_CONFIG)
        if root and config_path and Path(root) != Path(config_path):
            raise ConfigError(f"--config given twice: {root} and {config_path}")
        config_path = config_path or root
        overrides: dict[str, Any] = {
            "database_url": database_url,
            "scan_database_url": scan_database_url,
            "profile": profile,
        }
        if tables:
            overrides["tables"] = _pairs(tables, "--table")
        if options:
            overrides["options"] = _pairs(options, "--option")
        config = load_config(config_path, overrides)
        return fn(*args, config=config, **kwargs)

    return wrapper


@click.group(cls=ReaperGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="dcr-reaper")
@click.option("--debug", is_flag=True, help="Show tracebacks (also accepted after the subcommand).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML config file, for any subcommand (also accepted after it).",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, config_path: str | None) -> None:
    """Find and safely reap the orphaned clients that OAuth Dynamic Client Registration leaves behind."""
    ctx.meta[ROOT_CONFIG] = config_path


def output_format(given: str | None, output: str, allowed: Sequence[str], default: str = "table") -> str:
    """The format: --format, or the one -o's extension names; a contradiction, or without --format a file named
    after a format (`-o json`, meant as `--format json`), is a usage error."""
    path = Path(output)
    inferred = FORMAT_OF_SUFFIX.get(path.suffix.lower()) if output != "-" else None
    if not given and output != "-" and not path.suffix and path.name.lower() in {*allowed, "md"}:
        raise ConfigError(f"-o {output}: a file named like a format; for that format say --format {path.name}")
    if given and inferred and given != inferred:
        raise ConfigError(f"--format {given} contradicts -o {output} (a {inferred} file name); drop one of them")
    if given:
        return given
    if inferred is not None and inferred in allowed:
        return inferred
    if inferred:
        raise ConfigError(f"-o {output}: this command writes {', '.join(allowed)}, not {inferred}")
    return default


def _verdicts(value: tuple[str, ...]) -> frozenset[str]:
    chosen = {v.strip() for item in value for v in item.split(",") if v.strip()}
    unknown = chosen - {str(v) for v in VERDICTS}
    if unknown:
        raise ConfigError(f"--verdict: unknown verdict(s) {sorted(unknown)}; choose from {[str(v) for v in VERDICTS]}")
    return frozenset(chosen)


@cli.command()
@source_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(REPORT_FORMATS),
    help="table (default), json, csv, markdown or html; -o FILE.json etc. implies it.",
)
@click.option("--verdict", multiple=True, help="Only list clients with these verdicts (comma-separated or repeated).")
@click.option("--family", help="Only list clients of this family (id prefix or normalized name).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="Write to a file (replaced only once the report is complete).",
)
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when a terminal).")
@click.option("--wide", is_flag=True, help="Full client_ids in the terminal table (CSV, Markdown and JSON have them).")
def report(
    config: Config,
    fmt: str | None,
    verdict: tuple[str, ...],
    family: str | None,
    output: str,
    progress: bool | None,
    wide: bool,
) -> None:
    """Scan and classify every client, read-only; print what a reap would do."""
    from reaper.output import Filters, render
    from reaper.reaping.plan import resolve_family

    chosen = output_format(fmt, output, REPORT_FORMATS)

    filters = Filters(_verdicts(verdict), family, reapable=frozenset(config.policy.verdicts))
    rep = config.report

    def body(_stop: Stop) -> dict[str, FamilyStats]:
        with (
            output_file(output) as out,
            commands.classified(config, progress=Progress("scanning", progress)) as (stream, snapshot),
        ):
            render(chosen, stream, snapshot, out, filters, rep.top_families, rep.max_rows, rep.show_ips, wide)
        return snapshot.families

    families = stoppable(body)
    if family:
        resolve_family(family, families)  # an unknown family: exit 2 with the nearest names


@cli.command()
@source_options
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def check(config: Config, fmt: str) -> None:
    """The preflight: the profile against the live schema (every mismatch), then what to decide before a reap
    (indexes, refresh lifetimes, encodings, unmapped tables, the ledger and its rights, the clocks), each with
    its fix. Exit 0 when all is well, 7 when it matches with warnings, 3 when it does not match."""
    description, findings = stoppable(lambda _stop: commands.check(config))
    problems = [f for f in findings if f.level == "error"]
    warned = any(f.level == "warning" for f in findings)
    status = "mismatch" if problems else "warnings" if warned else "ok"
    if fmt == "json":
        doc = {
            "status": status,
            "profile": config.profile,
            "store": description,
            "findings": [{"level": f.level, "code": f.code, "message": f.message, "fix": f.fix} for f in findings],
        }
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        if problems:
            sys.exit(SchemaError.exit_code)
    elif problems:
        raise SchemaError([f.message for f in problems])  # one line each on stderr, as every command says it
    else:
        click.echo(f"ok: profile '{config.profile}' matches {description}")
        for f in sorted(findings, key=lambda f: ("error", "warning", "info").index(f.level)):
            click.echo(f"{f.level}: {f.message}")
            if f.fix:
                click.echo(f"  fix: {f.fix}")
    if warned:
        sys.exit(CHECK_WARNINGS)


@cli.group(invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """List the built-in profiles."""
    from reaper.profiles import builtin_profiles, load_profile

    if ctx.invoked_subcommand is None:
        for name in sorted(builtin_profiles()):
            p = load_profile(name)
            click.echo(f"{name:28} {p.description} [{', '.join(p.database)}]")


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Print a profile's mapping (a built-in name or a file path)."""
    from reaper.profiles import builtin_profiles, load_profile

    load_profile(name)  # validates, and gives the clear error for an unknown name
    path = builtin_profiles().get(name) or Path(name)
    click.echo(path.read_text(encoding="utf-8"), nl=False)


@cli.command()
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the demo database (default: ./dcr-reaper-demo.sqlite).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown"]), default="table", show_default=True
)
@click.option("--overwrite", is_flag=True, help="Replace the file at --db even if it is not an earlier demo database.")
def demo(db_path: str | None, fmt: str, overwrite: bool) -> None:
    """Build a SQLite database in mcp-memory-service's schema that reproduces the churn report, then report on it."""
    from reaper.demo import DEFAULT_PATH, build_demo
    from reaper.output import Filters, render

    try:
        path = build_demo(Path(db_path) if db_path else DEFAULT_PATH, overwrite=overwrite)
    except (FileExistsError, IsADirectoryError) as exc:
        raise ConfigError(str(exc)) from None
    url = f"sqlite:///{path}"
    config = load_config(None, {"database_url": url, "profile": "mcp-memory-service"}, environ={})

    def body(_stop: Stop) -> None:
        with commands.classified(config) as (stream, snapshot):
            everything = Filters(frozenset(str(v) for v in VERDICTS))
            render(fmt, stream, snapshot, sys.stdout, everything, config.report.top_families, config.report.max_rows)

    stoppable(body)
    click.echo(f"\nDemo database: {path}", err=fmt != "table")
    click.echo(
        f"Report on it yourself:  dcr-reaper report --profile mcp-memory-service --database-url {url}",
        err=fmt != "table",
    )


@cli.command()
@source_options
@click.option("--apply", "do_apply", is_flag=True, help="Act on the plan. Without it nothing is written.")
@click.option("--force", is_flag=True, help="Act even when the circuit breaker stops the plan (policy.max_fraction).")
@click.option("--family", help="Only this family (id prefix or normalized name).")
@click.option("--verdict", "verdicts", multiple=True, help="Only clients with these verdicts (comma-separated).")
@click.option("--client", "clients", multiple=True, help="Only this client (client_id or a unique prefix; repeatable).")
@click.option("--older-than", help="Only clients registered more than this long ago, e.g. 30d.")
@click.option("--limit", type=click.IntRange(min=1), help="Act on at most this many (the oldest) in this run.")
@click.option("--sql", "show_sql", is_flag=True, help="Print the statements each batch would run; write nothing.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when a terminal).")
def reap(
    config: Config,
    do_apply: bool,
    force: bool,
    family: str | None,
    verdicts: tuple[str, ...],
    clients: tuple[str, ...],
    older_than: str | None,
    limit: int | None,
    show_sql: bool,
    fmt: str,
    progress: bool | None,
) -> None:
    """Plan what the policy would reap (dry-run, the default); --apply does it, with tombstones."""
    from reaper.output.plan import render_run
    from reaper.reaping.evidence import EvidenceCollector
    from reaper.reaping.plan import RunResult, Selection

    if show_sql and do_apply:
        raise ConfigError("--sql prints the statements and writes nothing; it cannot be combined with --apply")
    try:
        age = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    wanted = _verdicts(verdicts)
    unknown = wanted - set(config.policy.verdicts)
    if unknown:
        covered = ", ".join(config.policy.verdicts)
        raise ConfigError(f"--verdict: {', '.join(sorted(unknown))} is not among policy.verdicts ({covered})")
    selection = Selection(family, wanted, frozenset(clients), age, limit)
    evidence = EvidenceCollector()  # what the scan showed, kept with the run

    def body(stop: Stop) -> None:
        the_plan = commands.plan(
            config, progress=Progress("scanning", progress), selection=selection, evidence=evidence
        )
        if show_sql:
            for n, batch in enumerate(commands.statements(config, the_plan), 1):
                click.echo(f"-- batch {n}")
                for stmt in batch:
                    click.echo(f"{stmt};")
            return
        if not do_apply:
            render_run(RunResult(the_plan, applied=False), fmt, sys.stdout, config.report.max_rows)
            if the_plan.cap_problem and not force:
                raise CapExceeded(f"{the_plan.cap_problem}; an --apply run would reap nothing")
            return
        if stop.requested.is_set():
            return  # stopped while planning: act on nothing
        stop.acting = True  # a stop now lets the batch in flight finish; the runner stops between batches
        result = commands.apply(
            config,
            the_plan,
            force=force,
            stop=stop.requested,
            progress=Progress("reaping", progress),
            evidence=evidence,
        )
        render_run(result, fmt, sys.stdout, config.report.max_rows)
        if stop.requested.is_set() and result.run_id:
            click.echo(
                f"dcr-reaper: stopped after {result.total_acted} client(s); run {result.run_id} is recorded and "
                f"`dcr-reaper restore --run {result.run_id[:8]}` puts them back",
                err=True,
            )

    stoppable(body)


@cli.command()
@source_options
@click.option("--run", "run_id", help="Restore every client reaped by this run (its id or a unique prefix).")
@click.option("--client", "client_id", help="Restore one client (client_id, key, or a unique prefix of either).")
@click.option("--progress/--no-progress", default=True, help="Progress and ETA on stderr (default: on).")
@click.option("--dry-run", is_flag=True, help="Say what would come back, and what is in the way; write nothing.")
def restore(config: Config, run_id: str | None, client_id: str | None, progress: bool, dry_run: bool) -> None:
    """Put reaped clients back exactly as they were, from their tombstones, in batches; running it again
    continues where it stopped, and a restored run restores as a no-op."""
    if dry_run:
        preview = stoppable(lambda _stop: commands.restore_preview(config, run_id=run_id, client_id=client_id))
        what = f"run {preview.run_id}" if preview.run_id else f"client {client_id}"
        if not preview.clients:
            click.echo(f"nothing to restore: {what} is restored already ({preview.already} client(s))")
            return
        per_table = ", ".join(f"{table} {n}" for table, n in preview.rows.items())
        click.echo(f"would restore {len(preview.clients)} client(s) of {what}: {per_table} row(s)")
        for cid, _key in preview.clients[: config.report.max_rows or None]:
            click.echo(f"  {cid}")
        if config.report.max_rows and len(preview.clients) > config.report.max_rows:
            click.echo(f"  ... and {len(preview.clients) - config.report.max_rows} more")
        if preview.present:
            shown = ", ".join(preview.present[:5]) + (" ..." if len(preview.present) > 5 else "")
            raise RestoreConflict(
                f"{len(preview.present)} of them are in the store again ({shown}): a restore would stop there"
            )
        return
    result = stoppable(
        lambda _stop: commands.restore(
            config, run_id=run_id, client_id=client_id, progress=Progress("restoring", progress)
        )
    )
    if not result.restored:
        what = f"run {result.run_id}" if result.run_id else f"client {client_id}"
        click.echo(f"nothing to restore: {what} is restored already ({result.already} client(s))")
        return
    rate = len(result.restored) / max(result.seconds, 1e-6)
    before = f"; {result.already} restored before" if result.already else ""
    click.echo(
        f"restored {len(result.restored)} client(s), {result.rows} row(s) in {result.seconds:.1f}s "
        f"({rate:,.0f}/s){before}"
    )


@cli.group(invoke_without_command=True)
@source_options
@click.option("--limit", type=int, default=50, show_default=True, help="Newest runs to list (0: all).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def runs(ctx: click.Context, config: Config, limit: int, fmt: str) -> None:
    """List the runs in the ledger: id, started, status, acted, restored. A run a crash left behind shows as
    interrupted, with the count its tombstones prove."""
    from reaper.output.plan import render_runs

    if ctx.invoked_subcommand is None:
        render_runs(commands.runs(config, limit or None), fmt, sys.stdout)


@runs.command("show")
@source_options
@click.argument("run")
@click.option("--limit", type=int, default=50, show_default=True, help="Clients to list (0: all).")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "html"]), help="table (default), json or html; -o implies."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="Write to a file (replaced only once complete).",
)
def runs_show(config: Config, run: str, limit: int, fmt: str | None, output: str) -> None:
    """One run (its id or a unique prefix): counts and clients; --format html: the evidence report of what it
    acted on, from the evidence kept with it."""
    from reaper.output.html import render_html
    from reaper.output.plan import render_run_detail
    from reaper.output.records import Filters

    fmt = output_format(fmt, output, ("table", "json", "html"))

    if fmt == "html":
        info, snap, items = commands.past_report(config, run)
        run_facts = {"id": info.id, "acted": info.acted, "started_at": info.started_at}
        software = (commands.run_show(config, info.id, limit=1).evidence or {}).get("software")
        run_facts["software"] = software or ""
        rep = config.report
        with output_file(output) as out:
            render_html(items, snap, out, Filters(), rep.top_families, rep.max_rows, run=run_facts)
    else:
        detail = commands.run_show(config, run, limit or None)
        with output_file(output) as out:
            render_run_detail(detail.info, detail.clients, fmt, out, detail.evidence is not None)


@cli.group()
def ledger() -> None:
    """The reaper's ledger: retention and the key that seals tombstones."""


@ledger.command("purge")
@source_options
@click.option("--older-than", "older_than", required=True, help="Delete tombstones and evidence older than this (90d).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def ledger_purge(config: Config, older_than: str, dry_run: bool) -> None:
    """Retention: delete tombstones (the secrets they keep) and evidence older than --older-than. The runs stay
    listed, as purged; their clients can no longer be restored."""
    from reaper.config import parse_duration

    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    tombs, evidence = commands.purge(config, seconds, dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {tombs} tombstone(s) and {evidence} evidence record(s) older than {older_than}")


@ledger.command("keygen")
def ledger_keygen() -> None:
    """Print a new key for ledger.key / ledger.key_file (tombstones sealed with Fernet)."""
    from reaper.ledger import new_key

    click.echo(new_key())


@cli.command()
@source_options
@click.option("--port", type=int, help="Port for /metrics, /healthz and /readyz (default 9465).")
@click.option("--bind", "bind_address", help="Address to listen on (default 0.0.0.0).")
@click.option("--interval", help="Scan interval, e.g. 5m (ignored with service.scan_cron).")
def serve(config: Config, port: int | None, bind_address: str | None, interval: str | None) -> None:
    """Run as a sidecar: scheduled scans (and reaps, if enabled), Prometheus metrics, health endpoints."""
    from reaper.service import serve as run_service

    changes = {"port": port, "bind_address": bind_address, "scan_interval": interval}
    config = with_overrides(config, {"service": {k: v for k, v in changes.items() if v is not None}})
    sys.exit(run_service(config))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning errors into one line on stderr and an exit code."""
    cli.main(args=argv, prog_name="dcr-reaper")
