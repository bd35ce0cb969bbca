"""A batch's keys select exactly those rows on every database: on PostgreSQL they travel as one array in its
text form, so a key that array syntax would split (quotes, commas, braces, backslashes) must not select its
neighbours, whose deletion would be a reap of clients nobody planned."""

from __future__ import annotations

import sqlalchemy as sa

from reaper.db import DatabaseImpl

TRICKY = ['a","b', "c\\", '\\"d', "e,f", "{g}", " h ", "NULL", "", "i'j", "ünï", 'k"']
NEIGHBOURS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "nul", "\\", '"', "{}", "ünï2"]


def test_keys_select_exactly_their_rows(any_db):
    md = sa.MetaData()
    text_keys = sa.Table("keyed_text", md, sa.Column("k", sa.String(48), primary_key=True))
    int_keys = sa.Table("keyed_int", md, sa.Column("k", sa.Integer, primary_key=True))
    md.create_all(any_db.engine)
    impl = DatabaseImpl.for_engine(any_db.engine)
    with any_db.engine.begin() as conn:
        conn.execute(text_keys.insert(), [{"k": k} for k in TRICKY + NEIGHBOURS])
        conn.execute(int_keys.insert(), [{"k": k} for k in range(1, 50)])
    with any_db.engine.connect() as conn:
        got = {r[0] for r in conn.execute(sa.select(text_keys.c.k).where(impl.in_(text_keys.c.k, TRICKY)))}
        assert got == set(TRICKY)
        one = {r[0] for r in conn.execute(sa.select(text_keys.c.k).where(impl.in_(text_keys.c.k, ['a","b'])))}
        assert one == {'a","b'}
        none = list(conn.execute(sa.select(text_keys.c.k).where(impl.in_(text_keys.c.k, []))))
        assert none == []
        ints = {r[0] for r in conn.execute(sa.select(int_keys.c.k).where(impl.in_(int_keys.c.k, ["3", "17", "42"])))}
        assert ints == {3, 17, 42}
        # The scan's tables are declared without types (`table_clause`): the database reads the keys as the
        # column's type, and the tricky ones still select only themselves.
        text_any, int_any = sa.table("keyed_text", sa.column("k")), sa.table("keyed_int", sa.column("k"))
        got = {r[0] for r in conn.execute(sa.select(text_any.c.k).where(impl.in_(text_any.c.k, TRICKY)))}
        assert got == set(TRICKY)
        ints = {r[0] for r in conn.execute(sa.select(int_any.c.k).where(impl.in_(int_any.c.k, ["3", "17", "42"])))}
        assert ints == {3, 17, 42}
