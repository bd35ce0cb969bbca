"""Ory Hydra v2: its tables (networks, clients, tokens per kind, flows) with Hydra's types per database (see
`kit.schemas.common`); `Hydra` writes its rows."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from kit.schemas.common import Json, Uuid, ago, create, insert, utcnow


def hydra(engine: sa.Engine) -> sa.MetaData:
    md = sa.MetaData()
    sa.Table("networks", md, sa.Column("id", Uuid, primary_key=True), sa.Column("created_at", sa.DateTime))
    sa.Table(
        "hydra_client",
        md,
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("nid", Uuid, sa.ForeignKey("networks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("client_name", sa.Text, nullable=False, default=""),
        sa.Column("client_secret", sa.Text, nullable=False, default=""),
        sa.Column("redirect_uris", Json, nullable=False),
        sa.Column("owner", sa.Text, nullable=False, default=""),
        sa.Column("metadata", Json),
        sa.Column("token_endpoint_auth_method", sa.String(25), nullable=False, default="none"),
        sa.Column("registration_access_token_signature", sa.String(128), nullable=False, default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    for name in ("hydra_oauth2_access", "hydra_oauth2_refresh", "hydra_oauth2_code"):
        cols = [
            sa.Column("signature", sa.String(255), primary_key=True),
            sa.Column("request_id", sa.String(40), nullable=False),
            sa.Column("requested_at", sa.DateTime, nullable=False),
            sa.Column("client_id", sa.String(255), nullable=False),
            sa.Column("nid", Uuid, nullable=False),
            sa.Column("subject", sa.String(255), nullable=False, default=""),
            sa.Column("active", sa.Boolean, nullable=False, default=True),
            sa.Column("expires_at", sa.DateTime, nullable=True),
            sa.Column("session_data", sa.Text, nullable=False, default=""),
        ]
        if name == "hydra_oauth2_refresh":
            cols += [sa.Column("first_used_at", sa.DateTime), sa.Column("used_times", sa.Integer)]
        sa.Table(
            name,
            md,
            *cols,
            sa.ForeignKeyConstraint(["client_id", "nid"], ["hydra_client.id", "hydra_client.nid"], ondelete="CASCADE"),
        )
    sa.Table(
        "hydra_oauth2_flow",
        md,
        sa.Column("login_challenge", sa.String(40), primary_key=True),
        sa.Column("nid", Uuid, nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("requested_at", sa.DateTime, nullable=False),
        sa.Column("consent_remember", sa.Boolean, nullable=False, default=False),
        sa.Column("consent_handled_at", sa.DateTime),
        sa.ForeignKeyConstraint(["client_id", "nid"], ["hydra_client.id", "hydra_client.nid"], ondelete="CASCADE"),
    )
    return create(engine, md)


class Hydra:
    """Writes Hydra rows: clients per network, tokens, flows."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.md = hydra(engine)
        self.t = self.md.tables

    def network(self) -> str:
        nid = str(uuid.uuid4())
        insert(self.engine, self.t["networks"], [{"id": nid, "created_at": utcnow()}])
        return nid

    def client(self, nid: str, name: str, redirect_uris: list[str], age: float, client_id: str | None = None) -> str:
        import json

        cid = client_id or str(uuid.uuid4())
        insert(
            self.engine,
            self.t["hydra_client"],
            [
                {
                    "id": cid,
                    "nid": nid,
                    "client_name": name,
                    "client_secret": "$pbkdf2-sha256$secret",
                    "redirect_uris": json.dumps(redirect_uris)
                    if self.engine.dialect.name != "postgresql"
                    else redirect_uris,
                    "created_at": ago(age),
                    "updated_at": ago(age),
                }
            ],
        )
        return cid

    def token(
        self, table: str, nid: str, client_id: str, age: float, expires_in: float | None, active: bool = True
    ) -> str:
        sig = uuid.uuid4().hex
        row = {
            "signature": sig,
            "request_id": uuid.uuid4().hex,
            "requested_at": ago(age),
            "client_id": client_id,
            "nid": nid,
            "subject": "alice",
            "active": active,
            "expires_at": None if expires_in is None else ago(age - expires_in),
        }
        if table == "hydra_oauth2_refresh":
            row |= {"first_used_at": None, "used_times": 0}
        insert(self.engine, self.t[table], [row])
        return sig

    def flow(self, nid: str, client_id: str, age: float, remember: bool = True) -> None:
        insert(
            self.engine,
            self.t["hydra_oauth2_flow"],
            [
                {
                    "login_challenge": uuid.uuid4().hex,
                    "nid": nid,
                    "client_id": client_id,
                    "subject": "alice",
                    "requested_at": ago(age),
                    "consent_remember": remember,
                    "consent_handled_at": ago(age),
                }
            ],
        )
