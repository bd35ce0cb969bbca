"""Act on Keycloak through its Admin REST API, never through SQL (the `keycloak` profile's [api]).

Keycloak caches clients and cleans up sessions in code, so a row changed behind its back is not seen: the scan
reads its database read-only, and every action is an Admin API call. Contract (Keycloak's documented API):

- token: `POST {url}/realms/{token_realm}/protocol/openid-connect/token`, client credentials grant;
- before acting: `GET /admin/realms/{realm}/clients/{id}` -> the representation, kept as the tombstone;
- delete: `DELETE /admin/realms/{realm}/clients/{id}`;
  disable: `PUT` of the representation with `enabled: false`;
- restore: `POST /admin/realms/{realm}/clients` with the kept representation (same id), or `PUT` it back.

Tombstones go to a separate ledger database (`ledger.url`): the auth database is never written. Each
tombstone is committed as `pending` before its call and marked `done` (or `void`) after, so a crash leaves
nothing unrecorded.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from reaper.config import Config
from reaper.db import make_engine, redact
from reaper.errors import ConfigError, ReaperError
from reaper.ledger import Ledger, decode_payload
from reaper.lock import RunLock, lock_name
from reaper.predicates import Compiler
from reaper.profile import BoundProfile, bind_profile
from reaper.scan import _table, live_condition

API = "keycloak"


class KeycloakError(ReaperError):
    """The Admin API refused or failed (exit 1)."""


class AdminClient:
    """A minimal Keycloak Admin REST client on the standard library; the token is never logged or shown."""

    def __init__(
        self,
        url: str,
        realm: str,
        client_id: str,
        client_secret: str,
        token_realm: str | None = None,
        timeout: float = 10.0,
        ca_file: str | None = None,
    ):
        self.base = url.rstrip("/")
        self.realm = realm
        self._client_id = client_id
        self._secret = client_secret
        self.token_realm = token_realm or realm
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._token: str | None = None
        self._token_expires = 0.0

    # -- transport -------------------------------------------------------------------------------------------

    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as res:  # noqa: S310
                return res.status, res.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KeycloakError(f"Keycloak at {self.base} unreachable: {reason}") from None

    def token(self) -> str:
        """A service-account access token (client credentials grant), reused until shortly before expiry."""
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        url = f"{self.base}/realms/{urllib.parse.quote(self.token_realm)}/protocol/openid-connect/token"
        form = urllib.parse.urlencode(
            {"grant_type": "client_credentials", "client_id": self._client_id, "client_secret": self._secret}
        ).encode()
        status, body = self._send("POST", url, form, {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200:
            raise KeycloakError(
                f"Keycloak refused the service account '{self._client_id}' a token (HTTP {status}{_error_of(body)})"
            )
        doc = json.loads(body)
        self._token = str(doc["access_token"])
        self._token_expires = time.monotonic() + max(5.0, float(doc.get("expires_in", 60)) - 30)
        return self._token

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """One Admin API call; a 401 (token expired early) gets one retry with a fresh token."""
        url = f"{self.base}/admin/realms/{urllib.parse.quote(self.realm)}{path}"
        body = None if payload is None else json.dumps(payload).encode()
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self.token()}", "Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            status, raw = self._send(method, url, body, headers)
            if status == 401 and attempt == 1:
                self._token = None
                continue
            return status, (json.loads(raw) if raw.strip() else None)
        raise AssertionError("unreachable")

    # -- clients ---------------------------------------------------------------------------------------------

    def get_client(self, key: str) -> dict[str, Any] | None:
        status, doc = self.call("GET", f"/clients/{urllib.parse.quote(key)}")
        if status == 404:
            return None
        _expect(status, 200, "GET", key)
        return dict(doc)

    def delete_client(self, key: str) -> bool:
        status, _ = self.call("DELETE", f"/clients/{urllib.parse.quote(key)}")
        if status == 404:
            return False
        _expect(status, 204, "DELETE", key)
        return True

    def update_client(self, key: str, representation: dict[str, Any]) -> None:
        status, _ = self.call("PUT", f"/clients/{urllib.parse.quote(key)}", representation)
        _expect(status, 204, "PUT", key)

    def create_client(self, representation: dict[str, Any]) -> None:
        status, _ = self.call("POST", "/clients", representation)
        if status == 409:
            raise KeycloakError(
                f"client {representation.get('clientId')!r} exists again in realm {self.realm}; not restored"
            )
        _expect(status, 201, "POST", str(representation.get("id")))


def _error_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    msg = doc.get("error_description") or doc.get("errorMessage") or doc.get("error") if isinstance(doc, dict) else ""
    return f": {msg}" if msg else ""


def _expect(status: int, want: int, method: str, key: str) -> None:
    if status != want:
        raise KeycloakError(f"Keycloak answered HTTP {status} to {method} of client {key} (expected {want})")


# --- setup ----------------------------------------------------------------------------------------------


def is_api_profile(profile: BoundProfile) -> bool:
    return profile.profile.api is not None and profile.profile.api.kind == API


def admin_client(config: Config, profile: BoundProfile) -> AdminClient:
    """The Admin API client from [keycloak] and options.realm; every missing setting listed."""
    kc = config.keycloak
    realm = profile.options.get("realm")
    problems = []
    if not realm:
        problems.append("options.realm: the keycloak profile acts in one realm; set its name")
    if not kc.url:
        problems.append("keycloak.url: Keycloak's base URL is needed to act through the Admin API")
    if not kc.client_id or kc.client_secret is None:
        problems.append(
            "keycloak.client_id / keycloak.client_secret: a service account that may manage clients "
            "(the secret from DCR_REAPER_KEYCLOAK__CLIENT_SECRET)"
        )
    if not config.ledger.url:
        problems.append("ledger.url: Keycloak's database is never written; keep the ledger in another database")
    if problems:
        raise ConfigError(problems)
    assert kc.url and kc.client_id and kc.client_secret is not None and realm
    return AdminClient(
        kc.url,
        str(realm),
        kc.client_id,
        kc.client_secret.get_secret_value(),
        kc.token_realm,
        kc.timeout,
        kc.ca_file,
    )


class _ApiActions(BoundProfile):
    """The bound profile as `reap.plan` must see it: the API's actions allowed, nothing written by SQL."""

    def __init__(self, bound: BoundProfile):
        assert bound.profile.api is not None
        delete = bound.profile.delete.model_copy(
            update={"actions": bound.profile.api.actions, "disable_set": {"enabled": False}}
        )
        super().__init__(bound.profile.model_copy(update={"delete": delete}), {}, bound.options, bound.ip)


def plan(config: Config, progress: Callable[[int, int], None] | None = None) -> Any:
    """`reap.plan` for an API-backed profile: the same read-only scan, classification and caps."""
    from reaper.reap import plan as sql_plan
    from reaper.report import open_source

    src = open_source(config)
    try:
        src.profile = _ApiActions(src.profile)
        return sql_plan(config, source=src, progress=progress)
    finally:
        src.engine.dispose()


# --- apply ----------------------------------------------------------------------------------------------


def live_keys(conn: Connection, profile: BoundProfile, keys: list[str], now: datetime) -> set[str]:
    """Of these client keys, those a live credential references now (read-only; the API has no such check)."""
    from reaper.dialects import dialect_for_name

    dialect = dialect_for_name(conn.dialect.name)
    found: set[str] = set()
    for cred in profile.credentials:
        t = _table(cred.table, _cred_columns(cred)).alias("cred")
        comp = Compiler(t, now, profile.options, dialect)
        where = [t.c[cred.ref].in_(keys), live_condition(cred, comp)]
        if cred.exclude is not None:
            where.append(sa.not_(comp.compile(cred.exclude)))
        found |= {str(r[0]) for r in conn.execute(sa.select(t.c[cred.ref]).where(*where).distinct())}
    return found


def _cred_columns(cred: Any) -> set[str]:
    from reaper.scan import _credential_columns

    return _credential_columns(cred)


def apply_keycloak(
    config: Config,
    the_plan: Any,
    force: bool = False,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    held_lock: RunLock | None = None,
    api: AdminClient | None = None,
) -> Any:
    """Execute a plan through Keycloak's Admin API, tombstoning each client before its call (S5).

    Under the run lock on the ledger database (S6); each batch re-checks liveness read-only first (S2).
    """
    from reaper.reap import CapExceeded, RunResult

    started = time.monotonic()
    if the_plan.cap_problem and not force:
        raise CapExceeded(f"{the_plan.cap_problem}; nothing reaped (raise the cap or pass --force)")
    profile = bind_profile(config)
    api = api or admin_client(config, profile)
    assert config.database_url and config.ledger.url
    result = RunResult(the_plan, applied=True)
    source = make_engine(config.database_url, readonly=True)  # Keycloak's database: read, never written
    ledger_engine = make_engine(config.ledger.url, readonly=False)
    ledger = Ledger(config.ledger)
    try:
        lock = (
            contextlib.nullcontext()
            if held_lock
            else RunLock(ledger_engine, lock_name(ledger_engine, config.ledger.prefix))
        )
        with lock:
            ledger.create(ledger_engine)
            with ledger_engine.begin() as lconn:
                run_id = ledger.start_run(lconn, "reap", profile.name, len(the_plan.candidates))
            result.run_id = run_id
            status, message = "ok", ""
            try:
                cands = the_plan.candidates
                size = config.policy.batch_size
                for i in range(0, len(cands), size):
                    if stop is not None and stop.is_set():
                        result.stopped = True
                        status, message = "stopped", "stopped on request between batches"
                        break
                    _batch(api, profile, source, ledger_engine, ledger, run_id, cands[i : i + size], result)
                    result.batches += 1
                    if progress:
                        progress(min(i + size, len(cands)), len(cands))
                    if config.policy.pause and i + size < len(cands):
                        time.sleep(config.policy.pause)
            except BaseException as exc:
                status, message = "failed", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                with ledger_engine.begin() as lconn:
                    ledger.finish_run(lconn, run_id, status, result.total_acted, message)
    except sa.exc.DBAPIError as exc:
        raise ReaperError(f"keycloak reap failed on {redact(ledger_engine.url)}: {exc.orig}") from None
    finally:
        source.dispose()
        ledger_engine.dispose()
    result.duration = time.monotonic() - started
    return result


def _batch(
    api: AdminClient,
    profile: BoundProfile,
    source: Engine,
    ledger_engine: Engine,
    ledger: Ledger,
    run_id: str,
    batch: list[Any],
    result: Any,
) -> None:
    now = datetime.now(UTC)
    with source.connect() as conn:
        live = live_keys(conn, profile, [c.key for c in batch], now)
        conn.rollback()
    for c in batch:
        if c.key in live:
            result.skipped["changed_since_scan"] += 1  # a session or consent arrived since the scan (S2)
            continue
        rep = api.get_client(c.key)
        if rep is None or rep.get("clientId") != c.client_id:
            result.skipped["gone"] += 1
            continue
        if c.action == "disable" and rep.get("enabled") is False:
            result.skipped["already_disabled"] += 1
            continue
        payload = {
            "api": API,
            "realm": api.realm,
            "representation": rep,
            "client": {"api": API},
            "children": {},
            "moved": [],
        }
        with ledger_engine.begin() as lconn:
            ledger.add_tombstones(
                lconn,
                [
                    ledger.tombstone_row(
                        run_id,
                        c.key,
                        c.client_id,
                        c.action,
                        c.verdict,
                        c.reason,
                        c.family,
                        payload,
                        "pending",
                    )
                ],
            )
        state = "void"
        try:
            if c.action == "disable":
                api.update_client(c.key, {**rep, "enabled": False})
                state = "done"
            elif api.delete_client(c.key):
                state = "done"
        finally:
            t = ledger.tombstones
            with ledger_engine.begin() as lconn:
                lconn.execute(
                    sa.update(t)
                    .where(t.c.run_id == run_id, t.c.client_key == c.key, t.c.state == "pending")
                    .values(state=state)
                )
        if state == "done":
            result.acted[(c.action, c.reason)] += 1
        else:
            result.skipped["gone"] += 1


# --- restore --------------------------------------------------------------------------------------------


def restore_keycloak(
    config: Config, run_id: str | None = None, client_id: str | None = None, api: AdminClient | None = None
) -> Any:
    """Put clients back through the Admin API: POST the kept representation (same id), or PUT `enabled`."""
    from reaper.restore import RestoreResult

    if bool(run_id) == bool(client_id):
        raise ConfigError("restore needs exactly one of --run or --client")
    profile = bind_profile(config)
    api = api or admin_client(config, profile)
    assert config.ledger.url
    ledger_engine = make_engine(config.ledger.url, readonly=False)
    ledger = Ledger(config.ledger)
    result = RestoreResult()
    try:
        with RunLock(ledger_engine, lock_name(ledger_engine, config.ledger.prefix)):
            with ledger_engine.connect() as lconn:
                if not ledger.exists(lconn):
                    raise ReaperError("no ledger found: nothing has been reaped here yet")
                tombs = ledger.open_tombstones(lconn, run_id=run_id, client_id=client_id)
            if client_id:
                tombs = tombs[-1:]
            if not tombs:
                raise ReaperError(
                    f"no unrestored tombstone for {'run ' + run_id if run_id else 'client ' + str(client_id)}"
                )
            for tomb in tombs:
                payload = decode_payload(tomb.payload)
                if payload.get("api") != API:
                    raise ReaperError(f"tombstone {tomb.id} was not written through the Keycloak API")
                rep = payload["representation"]
                if tomb.action == "disable":
                    current = api.get_client(tomb.client_key)
                    if current is None:
                        raise KeycloakError(f"client {tomb.client_id} is gone; cannot re-enable it")
                    api.update_client(tomb.client_key, {**current, "enabled": rep.get("enabled", True)})
                else:
                    api.create_client(rep)
                with ledger_engine.begin() as lconn:
                    t = ledger.tombstones
                    lconn.execute(sa.update(t).where(t.c.id == tomb.id).values(restored_at=time.time()))
                result.restored.append(tomb.client_key)
                result.rows += 1
    finally:
        ledger_engine.dispose()
    return result
