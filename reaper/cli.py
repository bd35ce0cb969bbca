"""Command line: a thin shell over `reaper.commands`. Errors print one line; --debug shows the traceback."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from reaper import __version__, commands
from reaper.analysis.model import VERDICTS
from reaper.config import Config, load_config, with_overrides
from reaper.errors import CapExceeded, ConfigError, ReaperError

EXIT_CODES = (
    "Exit codes: 0 ok, 1 runtime or database error, 2 usage or configuration error, 3 schema mismatch, "
    "4 another reaper holds the lock, 5 the plan exceeds a cap (nothing reaped), "
    "6 the reaper's clock and the database's disagree (nothing acted on)."
)
ERROR = "dcr-reaper: error: "


class ReaperGroup(click.Group):
    """The root command: every failure becomes one line on stderr and its documented exit code."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv
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
        profile: str | None,
        tables: tuple[str, ...],
        options: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        overrides: dict[str, Any] = {"database_url": database_url, "profile": profile}
        if tables:
            overrides["tables"] = _pairs(tables, "--table")
        if options:
            overrides["options"] = _pairs(options, "--option")
        config = load_config(config_path, overrides)
        return fn(*args, config=config, **kwargs)

    return wrapper


@click.group(cls=ReaperGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="dcr-reaper")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def cli(debug: bool) -> None:
    """Find and safely reap the orphaned clients that OAuth Dynamic Client Registration leaves behind."""


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
    type=click.Choice(["table", "json", "csv", "markdown", "html"]),
    default="table",
    show_default=True,
)
@click.option("--verdict", multiple=True, help="Only list clients with these verdicts (comma-separated or repeated).")
@click.option("--family", help="Only list clients of this family (id prefix or normalized name).")
@click.option("--output", "-o", type=click.File("w", encoding="utf-8", lazy=True), default="-", help="Write to a file.")
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when a terminal).")
def report(
    config: Config, fmt: str, verdict: tuple[str, ...], family: str | None, output: IO[str], progress: bool | None
) -> None:
    """Scan and classify every client, read-only; print what a reap would do."""
    from reaper.output import Filters, render

    filters = Filters(_verdicts(verdict), family)
    rep = config.report
    with commands.classified(config, progress=Progress("scanning", progress)) as (stream, snapshot):
        render(fmt, stream, snapshot, output, filters, rep.top_families, rep.max_rows, rep.show_ips)
        output.flush()


@cli.command()
@source_options
def check(config: Config) -> None:
    """Validate the config and the profile against the live schema; list every mismatch."""
    description, findings = commands.check(config)
    click.echo(f"ok: profile '{config.profile}' matches {description}")
    for f in findings:
        click.echo(f"{f.level}: {f.message}")
        if f.fix:
            click.echo(f"  fix: {f.fix}")


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
def demo(db_path: str | None, fmt: str) -> None:
    """Build a SQLite database in mcp-memory-service's schema that reproduces the churn report, then report on it."""
    from reaper.demo import DEFAULT_PATH, build_demo
    from reaper.output import Filters, render

    path = build_demo(Path(db_path) if db_path else DEFAULT_PATH)
    url = f"sqlite:///{path}"
    config = load_config(None, {"database_url": url, "profile": "mcp-memory-service"}, environ={})
    with commands.classified(config) as (stream, snapshot):
        everything = Filters(frozenset(str(v) for v in VERDICTS))
        render(fmt, stream, snapshot, sys.stdout, everything, config.report.top_families, config.report.max_rows)
    click.echo(f"\nDemo database: {path}", err=fmt != "table")
    click.echo(
        f"Report on it yourself:  dcr-reaper report --profile mcp-memory-service --database-url {url}",
        err=fmt != "table",
    )


@cli.command()
@source_options
@click.option("--apply", "do_apply", is_flag=True, help="Act on the plan. Without it nothing is written.")
@click.option("--force", is_flag=True, help="Act even when the plan exceeds max_per_run or max_fraction.")
@click.option("--sql", "show_sql", is_flag=True, help="Print the statements each batch would run; write nothing.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when a terminal).")
def reap(config: Config, do_apply: bool, force: bool, show_sql: bool, fmt: str, progress: bool | None) -> None:
    """Plan what the policy would reap (dry-run, the default); --apply does it, with tombstones."""
    from reaper.output.plan import render_run
    from reaper.reaping.plan import RunResult

    if show_sql and do_apply:
        raise ConfigError("--sql prints the statements and writes nothing; it cannot be combined with --apply")
    from reaper.reaping.evidence import EvidenceCollector

    evidence = EvidenceCollector()
    the_plan = commands.plan(config, progress=Progress("scanning", progress), evidence=evidence)
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
    stop = threading.Event()
    with _stop_on_ctrl_c(stop):
        result = commands.apply(
            config, the_plan, force=force, stop=stop, progress=Progress("reaping", progress), evidence=evidence
        )
    render_run(result, fmt, sys.stdout, config.report.max_rows)
    if stop.is_set():
        assert result.run_id
        click.echo(
            f"dcr-reaper: stopped on Ctrl-C after {result.total_acted} client(s); run {result.run_id} is recorded "
            f"and `dcr-reaper restore --run {result.run_id[:8]}` puts them back",
            err=True,
        )
        sys.exit(130)


@contextlib.contextmanager
def _stop_on_ctrl_c(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C stops the run between batches (what was done is recorded, each client tombstoned); a
    second one interrupts at once (the batch in flight rolls back where the store has transactions)."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("\ndcr-reaper: stopping after this batch (Ctrl-C again to interrupt at once)", err=True)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@cli.command()
@source_options
@click.option("--run", "run_id", help="Restore every client reaped by this run (its id or a unique prefix).")
@click.option("--client", "client_id", help="Restore one client (client_id, key, or a unique prefix of either).")
@click.option("--progress/--no-progress", default=True, help="Progress and ETA on stderr (default: on).")
def restore(config: Config, run_id: str | None, client_id: str | None, progress: bool) -> None:
    """Put reaped clients back exactly as they were, from their tombstones, in batches; running it again
    continues where it stopped, and a restored run restores as a no-op."""
    result = commands.restore(config, run_id=run_id, client_id=client_id, progress=Progress("restoring", progress))
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
@click.option("--format", "fmt", type=click.Choice(["table", "json", "html"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.File("w", encoding="utf-8", lazy=True), default="-", help="Write to a file.")
def runs_show(config: Config, run: str, limit: int, fmt: str, output: IO[str]) -> None:
    """One run (its id or a unique prefix): counts and clients; --format html: the evidence report of what it
    acted on, from the evidence kept with it."""
    from reaper.output.html import render_html
    from reaper.output.plan import render_run_detail
    from reaper.output.records import Filters

    if fmt == "html":
        info, snap, items = commands.past_report(config, run)
        run_facts = {"id": info.id, "acted": info.acted, "started_at": info.started_at}
        software = (commands.run_show(config, info.id, limit=1).evidence or {}).get("software")
        run_facts["software"] = software or ""
        rep = config.report
        render_html(items, snap, output, Filters(), rep.top_families, rep.max_rows, run=run_facts)
    else:
        detail = commands.run_show(config, run, limit or None)
        render_run_detail(detail.info, detail.clients, fmt, output, detail.evidence is not None)
    output.flush()


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
