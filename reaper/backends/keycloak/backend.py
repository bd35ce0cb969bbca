"""Keycloak: scan its database read-only, act only through its Admin REST API (the `keycloak` profile's [api]).

Keycloak caches clients and cleans up sessions in code, so a row changed behind its back is not seen. Tombstones
and the run lock live in a separate ledger database (`ledger.url`): the auth database is never written. Each
tombstone is committed as `pending` before its call and marked `done` (or `void`) after, so a crash leaves
nothing unrecorded; the next run settles what a crash left pending by asking the API.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from reaper.backends.base import BatchOutcome, Candidate
from reaper.backends.keycloak.admin import API, AdminClient, KeycloakError
from reaper.backends.sql.backend import SqlBackend
from reaper.backends.sql.lock import RunLock, lock_name
from reaper.backends.sql.scan import credential_compiler, credential_filter, live_condition
from reaper.config import Config
from reaper.db import describe_error, redact, table_clause, timeouts
from reaper.errors import ConfigError, DatabaseError
from reaper.ledger import Ledger, Tombstone
from reaper.profiles import BoundProfile, credential_columns


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
        kc.url, str(realm), kc.client_id, kc.client_secret.get_secret_value(), kc.token_realm, kc.timeout, kc.ca_file
    )


class KeycloakActor:
    """Acts through the Admin API; liveness re-checked read-only in the database right before each batch."""

    batches_at_once = 1  # the Admin API paces its own calls

    def __init__(self, backend: KeycloakBackend, api: AdminClient, ledger: Ledger):
        self.backend = backend
        self.profile = backend.profile
        self.api = api
        self.ledger = ledger

    def close(self) -> None:
        """The engines belong to the backend."""

    def _live_keys(self, keys: list[str]) -> set[str]:
        """Of these client keys, those a live credential references now (read-only; the API has no such check), on
        database_url: a scan replica may not have replayed the session that keeps one alive."""
        impl = self.backend.impl
        found: set[str] = set()
        try:
            with self.backend.read_engine.connect() as conn:
                now = datetime.fromtimestamp(impl.now(conn), UTC)
                for cred in self.profile.credentials:
                    t = table_clause(cred.table, credential_columns(cred)).alias("cred")
                    comp = credential_compiler(self.profile, cred, t, now, impl)
                    where = [t.c[cred.ref].in_(keys), live_condition(cred, comp)]
                    where += credential_filter(self.profile, cred, t, now, impl)
                    found |= {str(r[0]) for r in conn.execute(sa.select(t.c[cred.ref]).where(*where).distinct())}
                conn.rollback()
        except DBAPIError as exc:
            url = self.backend.url
            raise DatabaseError(f"liveness re-check on {redact(url)} failed: {describe_error(exc, url)}") from None
        return found

    def act(self, batch: Sequence[Candidate], run_id: str) -> BatchOutcome:
        outcome = BatchOutcome()
        live = self._live_keys([c.key for c in batch])
        for c in batch:
            if c.key in live:
                outcome.skipped["changed_since_scan"] += 1  # a session or consent arrived since the scan (S2)
                continue
            rep = self.api.get_client(c.key)
            if rep is None or rep.get("clientId") != c.client_id:
                outcome.skipped["gone"] += 1
                continue
            if c.action == "disable" and rep.get("enabled") is False:
                outcome.skipped["already_disabled"] += 1
                continue
            payload = {
                "api": API,
                "realm": self.api.realm,
                "representation": rep,
                "client": {"api": API},
                "children": {},
                "moved": [],
            }
            row = self.ledger.tombstone_row(
                run_id, c.key, c.client_id, c.action, c.verdict, c.reason, c.family, payload, "pending"
            )
            with self.ledger.begin() as lconn:
                self.ledger.add_tombstones(lconn, [row])
            state = "void"
            try:
                if c.action == "disable":
                    self.api.update_client(c.key, {**rep, "enabled": False})
                    state = "done"
                elif self.api.delete_client(c.key):
                    state = "done"
            finally:
                self.ledger.set_state(run_id, [c.key], state)
            if state == "done":
                outcome.done.append(c)
            else:
                outcome.skipped["gone"] += 1
        return outcome

    def recover(self) -> int:
        """Settle tombstones a crash left pending: the API says whether the call went through."""
        pending = self.ledger.pending()
        states = {}
        for tomb_id, key, action in pending:
            rep = self.api.get_client(key)
            if action == "disable":
                states[tomb_id] = "done" if rep is not None and rep.get("enabled") is False else "void"
            else:
                states[tomb_id] = "done" if rep is None else "void"
        if states:
            self.ledger.settle(states)
        return len(states)

    def live_now(self, keys: Sequence[str]) -> list[str]:
        # Keycloak removes a deleted client's sessions and consents with it: nothing can reference it afterwards.
        return []

    def restore(self, tombs: Sequence[Tombstone]) -> int:
        """POST the kept representation (same id), or PUT `enabled` back."""
        rows = 0
        for tomb in tombs:
            payload = tomb.payload
            if payload.get("api") != API:
                raise KeycloakError(f"tombstone {tomb.id} was not written through the Keycloak API")
            rep: dict[str, Any] = payload["representation"]
            if tomb.action == "disable":
                current = self.api.get_client(tomb.client_key)
                if current is None:
                    raise KeycloakError(f"client {tomb.client_id} is gone; cannot re-enable it")
                self.api.update_client(tomb.client_key, {**current, "enabled": rep.get("enabled", True)})
            else:
                self.api.create_client(rep)
            with self.ledger.begin() as lconn:
                self.ledger.mark_restored(lconn, [tomb])
            rows += 1
        return rows


class KeycloakBackend(SqlBackend):
    """The SQL scan of Keycloak's database; actions, lock and ledger elsewhere."""

    def __init__(self, config: Config, profile: BoundProfile, api: AdminClient | None = None):
        super().__init__(config, profile)
        self._api = api

    def api(self) -> AdminClient:
        if self._api is None:
            self._api = admin_client(self.config, self.profile)
        return self._api

    def lock(self) -> RunLock:
        self.api()  # every missing setting, listed before anything is taken
        engine = self._ledger_engine()
        db = self.config.database
        return RunLock(engine, lock_name(self.config.ledger.prefix), timeouts(db), db.sqlite_lock_dir)

    def _ledger_engine(self) -> Any:
        if not self.config.ledger.url:
            raise ConfigError("ledger.url: Keycloak's database is never written; keep the ledger in another database")
        return self._engine("ledger")

    def ledger(self) -> Ledger:
        return Ledger(self._ledger_engine(), self.config.ledger)

    def actor(self) -> KeycloakActor:
        api = self.api()
        return KeycloakActor(self, api, self.ledger())

    def statements(self, batch: Sequence[Candidate]) -> list[str]:
        realm = urllib.parse.quote(str(self.profile.options.get("realm") or ""))
        out = []
        for c in batch:
            path = f"/admin/realms/{realm}/clients/{urllib.parse.quote(c.key)}"
            out.append(f"PUT {path} (enabled: false)" if c.action == "disable" else f"DELETE {path}")
        return out
