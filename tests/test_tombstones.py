"""The tombstone payload's form: child rows as value arrays under their table's column names, read back as named
rows; tombstones written in the earlier form (a named object a row) still read and restore."""

from __future__ import annotations

import datetime as dt
import json

import orjson
import sqlalchemy as sa

from kit.config import make_config
from kit.databases import snapshot
from kit.schemas.authlib import AuthlibDB, fill_families
from reaper.commands import apply, plan, restore
from reaper.ledger import decode_payload, encode_row, encode_values


def test_child_rows_are_written_as_value_arrays_and_read_back_with_their_names(db):
    fams = fill_families(AuthlibDB(db.engine), families=2, orphans_each=3, seed=3)
    before = snapshot(db.engine)
    config = make_config(db.url)
    result = apply(config, plan(config))
    with db.engine.connect() as conn:
        raw = [p for (p,) in conn.execute(sa.text("SELECT payload FROM dcr_reaper_tombstones"))]
    assert len(raw) == sum(len(f.orphans) for f in fams)
    stored = orjson.loads(raw[0])
    token_cols = stored["columns"]["oauth2_token"]
    assert "client_id" in token_cols and all(isinstance(r, list) for r in stored["children"]["oauth2_token"])
    payload = decode_payload(raw[0])
    assert "columns" not in payload
    tokens = payload["children"]["oauth2_token"]
    wanted = {r[0]: r for r in before["oauth2_token"]}
    for row in tokens:
        assert tuple(row.values()) == wanted[row["id"]], "every value, in its column"
    restore(config, run_id=result.run_id)
    assert snapshot(db.engine) == before


def test_a_payload_in_the_earlier_form_reads_unchanged():
    row = {"id": 7, "client_id": "c1", "issued_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)}
    earlier = {"client_table": "c", "client": {"client_id": "c1"}, "children": {"t": [encode_row(row)]}, "moved": []}
    decoded = {**earlier, "children": {"t": [row]}}
    assert decode_payload(json.dumps(earlier)) == decoded
    compact = {**earlier, "columns": {"t": list(row)}, "children": {"t": [list(encode_values(tuple(row.values())))]}}
    assert decode_payload(json.dumps(compact)) == decoded
    plain = {**row, "issued_at": 1767323045}  # nothing encoded: the rows as they were stored
    assert decode_payload(json.dumps({**earlier, "children": {"t": [plain]}}))["children"]["t"] == [plain]
