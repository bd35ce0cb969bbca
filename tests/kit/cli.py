"""Real processes: the CLI (`python -m reaper`), `serve`, the external tools the tests need, and `poll`, the one
bounded wait every test uses instead of a loop of its own."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
ERROR_PREFIX = "dcr-reaper: error: "


# --- bounded waiting --------------------------------------------------------------------------------------


def poll(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    proc: subprocess.Popen[Any] | None = None,
    details: Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Fails the test after `timeout` seconds (with the last value), or as soon as `proc` has exited. `details`
    adds to the failure message (logs); exceptions of the `ignore` types count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{_output(proc, details)}")
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details else ""
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}; last value: {last!r}{extra}")
        time.sleep(interval)


def _output(proc: subprocess.Popen[Any], details: Callable[[], str] | None) -> str:
    if details is not None:
        return details()
    if proc.stdout is None and proc.stderr is None:
        return ""
    out, err = proc.communicate()
    return f"{out}\n{err}"


# --- external tools ---------------------------------------------------------------------------------------


def tool(name: str, package: str | None = None) -> str:
    """The path of a command some tests need. Missing: a skip with the reason on a developer's machine, a
    failure under CI (REAPER_REQUIRE_DBS or CI set), where `.ci/run` installs it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        why = f"'{name}' is not installed (Debian package {package or name})"
        if os.environ.get("REAPER_REQUIRE_DBS") or os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run installs it")
        pytest.skip(why)
    return path


# --- the CLI ----------------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test process environment without DCR_REAPER_* settings, importing reaper from this working tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCR_REAPER_") and k != "PYTHONPATH"}
    # The package may also be installed (non-editable) in site-packages: make the subprocess use this tree.
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "reaper", *args]


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m reaper ARGS` in `cwd` (so no ./dcr-reaper.toml of the repo is picked up)."""
    return subprocess.run(
        cli_command(args), cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def start_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m reaper ARGS` started in the background, stdout and stderr piped."""
    return subprocess.Popen(
        cli_command(args), cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def stderr_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def assert_errors(res: subprocess.CompletedProcess[str], exit_code: int, count: int | None = 1) -> list[str]:
    """Exit code as documented, only `dcr-reaper: error:` lines on stderr (`count` of them), no traceback."""
    lines = stderr_lines(res)
    assert res.returncode == exit_code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert lines, "an error must say something on stderr"
    assert all(line.startswith(ERROR_PREFIX) for line in lines), res.stderr
    if count is not None:
        assert len(lines) == count, res.stderr
    return [line.removeprefix(ERROR_PREFIX) for line in lines]


# --- HTTP -------------------------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path -> (status, body); the connection is always closed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8")
    finally:
        conn.close()


def try_get(port: int, path: str) -> tuple[int, str] | None:
    try:
        return http_get(port, path, timeout=2.0)
    except OSError:
        return None


# --- `python -m reaper serve` as a real process ------------------------------------------------------------


class ServeProcess:
    """`python -m reaper serve ... --port 0`; the real port comes from its `started` log line."""

    def __init__(self, args: list[str], cwd: Path, name: str = "serve", env: dict[str, str] | None = None):
        self.cwd = cwd
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in close()
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cli_command(["serve", "--bind", "127.0.0.1", "--port", "0", *args]),
            cwd=cwd,
            env=env or clean_env(),
            stdout=self._out,
            stderr=self._err,
        )
        self._port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (stdout and stderr), optionally only one event."""
        out = []
        for line in self.output().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (name is None or rec.get("event") == name):
                out.append(rec)
        return out

    def poll(self, predicate: Callable[[], T], timeout: float, what: str, **kw: Any) -> T:
        """`poll`, failing at once (with this process's output) if it exits."""
        return poll(predicate, timeout, what, proc=self.proc, details=self.output, **kw)

    def wait_started(self, timeout: float = 20) -> int:
        def started() -> int | None:
            ev = self.events("started")
            return int(ev[0]["listen"].rsplit(":", 1)[1]) if ev else None

        self._port = self.poll(started, timeout, "the 'started' log line")
        return self._port

    @property
    def port(self) -> int:
        assert self._port is not None, "call wait_started() first"
        return self._port

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body

    def wait_metric(self, name: str, pred: Callable[[float], bool], timeout: float, **labels: str) -> str:
        """Poll /metrics until sample `name` satisfies pred; return that exposition."""
        from kit.prometheus import value  # kit.prometheus runs its tools through this module

        def check() -> str | None:
            got = try_get(self.port, "/metrics")
            if got is None or got[0] != 200:
                return None
            v = value(got[1], name, **labels)
            return got[1] if v is not None and pred(v) else None

        return self.poll(check, timeout, f"{name}{labels or ''} on :{self.port}")

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM, then wait at most `timeout`: (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout}s of SIGTERM:\n{self.output()[-3000:]}")
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        self._out.close()
        self._err.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
