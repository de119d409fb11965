"""The prepared upsert (``exporters/prepared.py``) writes exactly what SQLAlchemy's ordinary execution writes.

The same batches go through two TableWriters into two databases: one the way the SQL sink writes (the
prepared statement), one forced onto SQLAlchemy's ordinary execution (a connection with a schema translate
map never takes the prepared path). The tables are then compared column by column, as the database stores
them (SQLite: storage class and literal; PostgreSQL: the text of every value).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

import cmbagent_schema as cmb
from otel_cmbagent.exporters.prepared import PreparedUpsert
from otel_cmbagent.exporters.sql import make_engine
from otel_cmbagent.exporters.table_writer import TableWriter
from otel_cmbagent.table.schema import execution_events_table

_AT = datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def two_urls(request, tmp_path) -> tuple[str, str]:
    """Two empty databases of one kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'prepared.db'}", f"sqlite:///{tmp_path / 'ordinary.db'}"
    first = request.getfixturevalue("postgres_url")
    server = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"create database {name}"))
    admin.dispose()
    return first, first.rsplit("/", 1)[0] + "/" + name


def _ordinary(engine: sa.Engine) -> sa.Engine:
    """The same engine, on SQLAlchemy's ordinary execution (see the module docstring)."""
    return engine.execution_options(schema_translate_map={None: None})


def _event(number: int, *, status: str = "completed", **columns: Any) -> dict[str, Any]:
    """A row shaped like ``span_row``'s."""
    at = _AT + timedelta(microseconds=number * 1001)
    row = {
        "id": f"00000000-0000-5000-8000-{number:012d}", "run_id": None, "node_id": None, "step_id": None,
        "session_id": None, "parent_event_id": None, "event_type": "llm_call",
        "event_subtype": "complete" if status != "running" else "start", "agent_name": "engineer",
        "agent_role": None, "timestamp": at, "started_at": at, "completed_at": at + timedelta(microseconds=7),
        "duration_ms": number, "inputs": {"messages": [{"role": "user", "content": f"question {number}"}]},
        "outputs": None, "error_message": None, "meta": {"span_name": "chat", "tokens": number},
        "execution_order": number, "depth": 1, "status": status,
        "trace_id": f"{number:032x}", "span_id": f"{number:016x}",
    }
    row.update(columns)
    return row


def _batches(run_id: str | None = None, session_id: str | None = None) -> list[list[dict[str, Any]]]:
    """Batches with what a value can be: unicode, NUL and lone surrogates (replaced), NaN, booleans, large and
    negative integers, NULLs in every nullable column, datetimes with microseconds (with and without a time
    zone), rows missing columns, and a start row that must not overwrite its final row."""
    ids = {"run_id": run_id, "session_id": session_id}
    unicode = {"content": "été ✓ 数据 🚀 \u00a0tab\tquote\" back\\slash", "ok": True, "no": False, "n": -3,
               "big": 2**40, "pi": 3.141592653589793, "none": None, "nested": [[], {}, [1, "two", None]]}
    first = [
        _event(1, **ids, inputs={"messages": [unicode]}, outputs={"text": "naïve"}),
        _event(2, **ids, status="running", completed_at=None, duration_ms=None, outputs=None),
        _event(3, **ids, meta={"nul": "a\x00b", "lone": "x\ud800y", "nan": float("nan"), "inf": float("inf"),
                               "bytes": "é".encode(), "key\x00": 1}, error_message="bad \x00 byte",
               agent_name="agent\x00name"),
        _event(4, **ids, inputs=None, meta=None, agent_role="planner", depth=0, duration_ms=2**31 + 5),
        _event(5, **ids, timestamp=datetime(2026, 3, 1, 12, 0, 0, 1), started_at=None,
               completed_at=datetime(2026, 3, 1, 12, 0, 0, 999999, tzinfo=timezone(timedelta(hours=5)))),
    ]
    partial = {key: value for key, value in _event(6, **ids).items() if key not in ("agent_role", "outputs")}
    second = [
        _event(2, **ids, outputs={"messages": ["final"]}),  # the running row becomes final
        _event(1, **ids, status="running", inputs=None),  # a late start: never overwrites
        partial, _event(7, **ids, parent_event_id=first[0]["id"]),
    ]
    return [first, second]


def _dump(engine: sa.Engine, table: sa.Table) -> list[tuple[Any, ...]]:
    """Every row as stored: SQLite's storage class and literal of each value, PostgreSQL's text of it."""
    quote = engine.dialect.identifier_preparer.quote
    columns = [quote(column.name) for column in table.c]
    if engine.dialect.name == "sqlite":
        values = ", ".join(f"typeof({name}), quote({name})" for name in columns)
    else:
        values = ", ".join(f"{name}::text" for name in columns)
    with engine.connect() as connection:
        return [tuple(row) for row in connection.exec_driver_sql(
            f"select {values} from {quote(table.name)} order by {quote('id')}")]


def _write_both_ways(prepared: TableWriter, ordinary: TableWriter, batches: list[list[dict[str, Any]]]) -> None:
    for batch in batches:
        assert prepared.write(batch) == ordinary.write(batch)
    assert any(value is not None for value in prepared._prepared.values())  # the prepared path was taken
    assert not ordinary._prepared  # ... and not here


def _assert_same_tables(first: sa.Engine, second: sa.Engine, table: sa.Table, rows: int) -> None:
    written, expected = _dump(first, table), _dump(second, table)
    assert len(written) == len(expected) == rows
    for new, old in zip(written, expected):
        for column, (a, b) in enumerate(zip(new, old)):
            assert a == b, (column, a, b)


def test_our_table_is_written_exactly_as_sqlalchemy_writes_it(two_urls):
    engines = [make_engine(url) for url in two_urls]
    tables = [execution_events_table(), execution_events_table()]
    for engine, table in zip(engines, tables):
        table.metadata.create_all(engine)
    prepared, ordinary = TableWriter(engines[0], tables[0]), TableWriter(_ordinary(engines[1]), tables[1])
    _write_both_ways(prepared, ordinary, _batches())
    _assert_same_tables(engines[0], engines[1], tables[0], rows=7)
    with engines[0].connect() as connection:  # the late start row did not overwrite its final row
        status = connection.execute(sa.select(tables[0].c.status).where(tables[0].c.id == _event(1)["id"]))
        assert status.scalar_one() == "completed"


def test_a_value_a_bind_processor_refuses_is_reported_as_sqlalchemy_reports_it(two_urls):
    """A timestamp written as a number (by another tool, in a spill file) fails the batch as a StatementError with
    SQLAlchemy's first line both ways: the sink and ``replay`` then isolate the row and report it alike."""
    engines = [make_engine(url) for url in two_urls]
    tables = [execution_events_table(), execution_events_table()]
    for engine, table in zip(engines, tables):
        table.metadata.create_all(engine)
    writers = TableWriter(engines[0], tables[0]), TableWriter(_ordinary(engines[1]), tables[1])
    batch = [_event(1), _event(2, timestamp=1767225600)]
    errors = []
    for writer in writers:
        with pytest.raises(sa.exc.StatementError) as raised:
            writer.write(batch)
        errors.append(str(raised.value).splitlines()[0])
        assert _dump(writer.engine, writer.table) == []  # nothing of the refused batch is written
    assert errors[0] == errors[1] and errors[0].startswith("("), errors  # "(builtins.TypeError) ...", "(psycopg..."
    assert any(value is not None for value in writers[0]._prepared.values())


def test_cmbagent_table_is_written_exactly_as_sqlalchemy_writes_it(two_urls):
    """cmbagent's own table: its engine (no json_serializer of ours), NOT NULL run/session, JSON ``None`` as
    ``null`` (no ``none_as_null``), timezone-less TIMESTAMP columns, its foreign keys and side tables."""
    engines = [cmb.cmbagent_engine(url) for url in two_urls]
    run_id, session_id = str(uuid.uuid4()), str(uuid.uuid4())
    for engine in engines:
        cmb.add_run(engine, run_id, session_id)
    prepared = TableWriter(engines[0], cmb.execution_events)
    ordinary = TableWriter(_ordinary(engines[1]), cmb.execution_events)
    _write_both_ways(prepared, ordinary, _batches(run_id, session_id))
    _assert_same_tables(engines[0], engines[1], cmb.execution_events, rows=7)


def test_a_large_batch_on_sqlite_goes_in_a_few_multi_row_statements(tmp_path):
    """150 rows, some of them twice (a start then its final row, in one batch as ``replay`` may pass it): the
    table equals SQLAlchemy's ordinary executemany, written in chunks of 64, 64, 16, 4 and 2 rows (Python's
    sqlite3 gives up the GIL around every row's step: a statement per row hands it to the agent's thread and
    back 150 times)."""
    engines = [make_engine(f"sqlite:///{tmp_path / name}") for name in ("prepared.db", "ordinary.db")]
    tables = [execution_events_table(), execution_events_table()]
    for engine, table in zip(engines, tables):
        table.metadata.create_all(engine)
    statements: list[tuple[int, bool]] = []

    @sa.event.listens_for(engines[0], "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ARG001
        if statement.startswith("INSERT INTO execution_events"):
            statements.append((statement.count("?"), executemany))

    rows = [_event(n, status="running" if n % 3 else "completed") for n in range(1, 151)]
    finals = [_event(n) for n in range(1, 151, 3)]
    prepared, ordinary = TableWriter(engines[0], tables[0]), TableWriter(_ordinary(engines[1]), tables[1])
    _write_both_ways(prepared, ordinary, [rows + finals, [_event(200)]])
    _assert_same_tables(engines[0], engines[1], tables[0], rows=151)
    per_row = len(tables[0].c) + 1  # the columns and the WHERE's status
    assert [(marks - 1) // (per_row - 1) for marks, _ in statements] == [64, 64, 16, 4, 2, 1]
    assert not any(executemany for _, executemany in statements)
    prepared_upsert = next(value for value in prepared._prepared.values() if value is not None)
    sql = prepared_upsert.multi_row_sql(2)
    final, start = prepared_upsert.row_values([_event(300), _event(300, status="running", outputs=None)])
    with engines[0].begin() as connection:  # a start row after its final row, in one statement: the final stays
        connection.exec_driver_sql(sql, (*final, *start, "running"))
        assert connection.execute(sa.select(tables[0].c.status).where(tables[0].c.id == _event(300)["id"])
                                  ).scalar_one() == "completed"


_KINDS = sa.Table(
    "kinds", sa.MetaData(),
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("status", sa.String(20)),
    sa.Column("flag", sa.Boolean),
    sa.Column("count", sa.BigInteger),
    sa.Column("small", sa.SmallInteger),
    sa.Column("ratio", sa.Float),
    sa.Column("amount", sa.Numeric(10, 6)),
    sa.Column("day", sa.Date),
    sa.Column("at", sa.DateTime),
    sa.Column("doc", sa.JSON),
    sa.Column("body", sa.Text),
)


def test_other_column_types_are_written_exactly_as_sqlalchemy_writes_them(two_urls):
    engines = [make_engine(url) for url in two_urls]
    for engine in engines:
        _KINDS.metadata.create_all(engine)
    rows = [
        {"id": "a", "status": "completed", "flag": True, "count": 2**40, "small": -7, "ratio": 0.1, "amount": 1.5,
         "day": _AT.date(), "at": _AT.replace(tzinfo=None), "doc": {"é": [True, None]}, "body": "x\x00y"},
        {"id": "b", "status": "running", "flag": False, "count": None, "small": 2**20, "ratio": None, "amount": None,
         "day": None, "at": None, "doc": None, "body": None},
        {"id": "c", "status": "completed", "flag": None, "doc": [1, 2.5, "three"]},
    ]
    prepared, ordinary = TableWriter(engines[0], _KINDS), TableWriter(_ordinary(engines[1]), _KINDS)
    _write_both_ways(prepared, ordinary, [rows])
    _assert_same_tables(engines[0], engines[1], _KINDS, rows=3)


def test_statements_it_cannot_reproduce_go_the_ordinary_way(tmp_path):
    """A Python-side default to compute per row, or a parameter name the dialect escapes: not prepared, and the
    rows still go in."""
    table = sa.Table(
        "odd", sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("status", sa.String(20)),
        sa.Column("with default", sa.String(20), default="filled"),
        sa.Column("percent%", sa.Integer),
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'odd.db'}")
    table.metadata.create_all(engine)
    writer = TableWriter(engine, table)
    assert writer.write([{"id": "a", "status": "completed", "percent%": 3}]) == (1, [])
    assert list(writer._prepared.values()) == [None]  # the default is computed per row by SQLAlchemy
    with engine.connect() as connection:
        assert connection.execute(sa.select(table)).all() == [("a", "completed", "filled", 3)]
    upsert = writer._upsert_statement("postgresql", frozenset({"id", "status", "with default", "percent%"}))
    dialect = postgresql.psycopg.dialect()
    assert PreparedUpsert.build(upsert, dialect, frozenset({"id", "status", "with default", "percent%"})) is None


def test_json_text_of_the_kept_encoder_is_the_strict_encoders():
    """json_text (the engines' json_serializer) reuses one C encoder per thread: its text is the one the ordinary
    strict encoder gives, for every value, also after a value it refused (NaN, a cycle, bytes) and on another
    thread; a Python without the C encoder gets the ordinary one (``encoder = False``)."""
    import threading

    from otel_cmbagent.table import fit

    cycle: list[Any] = []
    cycle.append(cycle)
    values = [{"a": 1, "é": ["🚀", None, True, -0.0, 1e300, 2**70]}, [1.5, float("nan")], {"x": "a\x00b"},
              {"lone": "\ud800"}, {1: 2, None: 4, 2.5: 1}, {"b": b"x"}, "text", 3, None, (1, 2), cycle,
              {"after": "a cycle"}, {"meta": {"nested": [{"deep": "ok"}]}}]

    def texts() -> list[str]:
        return [fit.json_text(value) for value in values]

    fit._local.encoder = None
    kept = texts()
    fit._local.encoder = False
    ordinary = texts()
    fit._local.encoder = None
    assert kept == ordinary
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.extend(texts()))
    thread.start()
    thread.join()
    assert other == ordinary
