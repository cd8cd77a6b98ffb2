"""The statements of the batched writes, built from a model's own fields and the connection's
quoting: a multi-row ``INSERT ... RETURNING``, an ``UPDATE`` with one value per row, and the
``SELECT``, ``UPDATE`` and ``DELETE`` of the rows named by a list of keys.

Why not the ORM: on this path each statement names up to a few hundred rows and runs a few
milliseconds apart. Building and compiling a ``QuerySet`` costs about 0.3 ms of Python for each
statement (measured on the 2-CPU benchmark machine), more than the database takes to run it;
Django 5.2's ``bulk_create`` on PostgreSQL sends rows as arrays (``UNNEST``) that psycopg's
client-side binding escapes in Python character by character, about 0.5 ms per 2 KB environ; and
a ``Case``/``When`` of a hundred rows takes longer to compile than to run.

The statements are plain SQL that PostgreSQL, SQLite (3.35+, for ``RETURNING``) and MySQL read
alike, except that on PostgreSQL a list of keys is one array parameter (``= ANY(%s)``), which
keeps the statement short enough for psycopg to reuse its parsing. Values go through each field's
``get_db_prep_save`` as the ORM's would, and statements through Django's cursor, so query logging
and execute wrappers see them.

Rows that carry environs go to PostgreSQL by ``COPY`` (:func:`insert_rows`): both psycopg2 and
psycopg 3 (as Django configures it) bind parameters on the client, so an environ in an
``INSERT`` becomes a quoted literal that the server's SQL scanner then reads byte by byte, about
4 ms per megabyte on the benchmark machine; ``COPY`` takes the bytes as they are, and costs a
sixth of that.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, models

#: Most bytes of values in one statement, so that a batch of large environs is not one
#: statement of hundreds of megabytes.
STATEMENT_BYTES = 8 * 1024 * 1024
#: Most parameters in one statement, where the database sets no lower limit.
MAX_PARAMS = 10_000
#: Most keys named by one statement.
MAX_KEYS = 1000

#: Field types whose ``get_db_prep_save`` returns a ``str`` (or an ``int``) unchanged.
_TEXT_TYPES = frozenset({"CharField", "TextField"})
_INTEGER_TYPES = frozenset(
    {
        "IntegerField",
        "BigIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "SmallIntegerField",
        "AutoField",
        "BigAutoField",
    }
)


def _db() -> Any:
    # The connection itself, not the thread-local proxy, which costs a lookup per attribute.
    return connections[DEFAULT_DB_ALIAS]


def _field(model: type[models.Model], name: str) -> Any:
    return model._meta.get_field(name)


def _preparer(field: Any, db: Any) -> Callable[[Any], Any]:
    """``field.get_db_prep_save`` for ``db``, without the call for values it would not change."""
    target = field.target_field if field.is_relation else field
    kind = target.get_internal_type()
    prepare = field.get_db_prep_save
    if kind in _TEXT_TYPES:
        same: type = str
    elif kind in _INTEGER_TYPES:
        same = int
    else:
        return lambda value: prepare(value, db)
    return lambda value: value if value is None or type(value) is same else prepare(value, db)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes) else 8


def _row_chunks(db: Any, rows: Sequence[Sequence[Any]], width: int) -> list[Sequence[Any]]:
    limit = min(MAX_PARAMS, db.features.max_query_params or MAX_PARAMS)
    per_statement = max(1, limit // max(1, width))
    out: list[Sequence[Any]] = []
    start, size = 0, 0
    for i, row in enumerate(rows):
        row_size = sum(_size(v) for v in row)
        if i > start and (i - start >= per_statement or size + row_size > STATEMENT_BYTES):
            out.append(rows[start:i])
            start, size = i, 0
        size += row_size
    if start < len(rows):
        out.append(rows[start:])
    return out


def _key_chunks(db: Any, keys: Sequence[Any]) -> list[Sequence[Any]]:
    limit = min(MAX_KEYS, db.features.max_query_params or MAX_KEYS)
    ordered = sorted(keys)
    return [ordered[i : i + limit] for i in range(0, len(ordered), limit)]


def _keys_condition(db: Any, field: Any, keys: Sequence[Any]) -> tuple[str, list[Any]]:
    column = db.ops.quote_name(field.column)
    prepare = _preparer(field, db)
    values = [prepare(k) for k in keys]
    if db.vendor == "postgresql":
        return f"{column} = ANY(%s)", [values]
    return f"{column} IN ({', '.join(['%s'] * len(values))})", values


def _conditions(
    db: Any, model: type[models.Model], where: Mapping[str, Any] | None
) -> tuple[str, list[Any]]:
    sql, params = "", []
    for name, value in (where or {}).items():
        f = _field(model, name)
        sql += f" AND {db.ops.quote_name(f.column)} = %s"
        params.append(f.get_db_prep_save(value, db))
    return sql, params


def _target(
    model: type[models.Model], names: Sequence[str], db: Any
) -> tuple[str, list[Callable[[Any], Any]]]:
    """``table (columns)`` of ``names`` for an INSERT or a COPY, and each column's preparer."""
    quote = db.ops.quote_name
    fields = [_field(model, name) for name in names]
    columns = ", ".join(quote(f.column) for f in fields)
    return f"{quote(model._meta.db_table)} ({columns})", [_preparer(f, db) for f in fields]


def insert_returning(
    model: type[models.Model],
    names: Sequence[str],
    rows: Sequence[Sequence[Any]],
    returning: Sequence[str],
    *,
    skip_conflicts_on: str | None = None,
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (values in the order of ``names``); returns ``returning`` of each new row.

    With ``skip_conflicts_on`` (a unique field) a row whose key is taken is skipped
    (``ON CONFLICT DO NOTHING``) and returns nothing. The rows returned may come in any order.
    """
    if not rows:
        return []
    db = _db()
    quote = db.ops.quote_name
    target, prepare = _target(model, names, db)
    head = f"INSERT INTO {target} VALUES "
    tail = ""
    if skip_conflicts_on is not None:
        tail += f" ON CONFLICT ({quote(_field(model, skip_conflicts_on).column)}) DO NOTHING"
    tail += " RETURNING " + ", ".join(quote(_field(model, name).column) for name in returning)
    one_row = "(" + ", ".join(["%s"] * len(prepare)) + ")"
    out: list[tuple[Any, ...]] = []
    with db.cursor() as cursor:
        for part in _row_chunks(db, rows, len(prepare)):
            params = [p(value) for row in part for p, value in zip(prepare, row, strict=True)]
            cursor.execute(head + ", ".join([one_row] * len(part)) + tail, params)
            out.extend(tuple(r) for r in cursor.fetchall())
    return out


def update_each(
    model: type[models.Model],
    key: str,
    name: str,
    values: Mapping[Any, Any],
    *,
    also: Mapping[str, Any] | None = None,
    where: Mapping[str, Any] | None = None,
) -> int:
    """Set field ``name`` of the row whose ``key`` is each key of ``values`` to its value (and
    the fields of ``also`` to one value for all), on rows that also match ``where`` (equality);
    returns how many rows were updated."""
    if not values:
        return 0
    db = _db()
    quote = db.ops.quote_name
    key_field, field = _field(model, key), _field(model, name)
    prepare_key, prepare = _preparer(key_field, db), _preparer(field, db)
    sets_tail, sets_params = "", []
    for other, value in (also or {}).items():
        f = _field(model, other)
        sets_tail += f", {quote(f.column)} = %s"
        sets_params.append(f.get_db_prep_save(value, db))
    extra, extra_params = _conditions(db, model, where)
    updated = 0
    with db.cursor() as cursor:
        for part in _row_chunks(db, sorted(values.items()), 3):
            params: list[Any] = []
            for k, v in part:
                params.append(prepare_key(k))
                params.append(prepare(v))
            keys, key_params = _keys_condition(db, key_field, [k for k, _ in part])
            cursor.execute(
                f"UPDATE {quote(model._meta.db_table)} SET {quote(field.column)} = "
                f"CASE {quote(key_field.column)} {' '.join(['WHEN %s THEN %s'] * len(part))} END"
                f"{sets_tail} WHERE {keys}{extra}",
                params + sets_params + key_params + extra_params,
            )
            updated += cursor.rowcount
    return updated


def _by_keys(
    model: type[models.Model],
    key: str,
    keys: Sequence[Any],
    where: Mapping[str, Any] | None,
    statement: Callable[[Any, str], str],
    leading: Sequence[Any] = (),
) -> Iterator[Any]:
    """Run ``statement(db, condition)`` once for each chunk of ``keys``, the condition naming the
    chunk's rows (and ``where``), after parameters ``leading``; yields the cursor after each."""
    db = _db()
    key_field = _field(model, key)
    extra, extra_params = _conditions(db, model, where)
    with db.cursor() as cursor:
        for part in _key_chunks(db, keys):
            condition, params = _keys_condition(db, key_field, part)
            cursor.execute(statement(db, condition + extra), [*leading, *params, *extra_params])
            yield cursor


def select_in(
    model: type[models.Model],
    names: Sequence[str],
    key: str,
    keys: Sequence[Any],
    *,
    where: Mapping[str, Any] | None = None,
    lock: bool = False,
) -> list[tuple[Any, ...]]:
    """``names`` of the rows whose ``key`` is one of ``keys`` (and that match ``where``), in
    ``key`` order; with ``lock``, ``FOR UPDATE`` where the database has it.

    Values come back as the driver gives them: for text and integer columns, what the ORM gives.
    """

    def statement(db: Any, condition: str) -> str:
        quote = db.ops.quote_name
        columns = ", ".join(quote(_field(model, name).column) for name in names)
        suffix = " FOR UPDATE" if lock and db.features.has_select_for_update else ""
        return (
            f"SELECT {columns} FROM {quote(model._meta.db_table)} WHERE {condition} "
            f"ORDER BY {quote(_field(model, key).column)}{suffix}"
        )

    out: list[tuple[Any, ...]] = []
    for cursor in _by_keys(model, key, keys, where, statement):
        out.extend(tuple(r) for r in cursor.fetchall())
    return out


def update_in(
    model: type[models.Model],
    key: str,
    keys: Sequence[Any],
    changes: Mapping[str, Any],
    *,
    where: Mapping[str, Any] | None = None,
) -> int:
    """Set ``changes`` (field name: value) on the rows whose ``key`` is one of ``keys``."""
    db = _db()
    fields = [_field(model, name) for name in changes]
    values = [f.get_db_prep_save(v, db) for f, v in zip(fields, changes.values(), strict=True)]

    def statement(db: Any, condition: str) -> str:
        quote = db.ops.quote_name
        sets = ", ".join(f"{quote(f.column)} = %s" for f in fields)
        return f"UPDATE {quote(model._meta.db_table)} SET {sets} WHERE {condition}"

    return sum(c.rowcount for c in _by_keys(model, key, keys, where, statement, values))


def can_delete_plainly(
    model: type[models.Model], *, but_for: Sequence[type[models.Model]] = ()
) -> bool:
    """Whether deleting rows of ``model`` needs nothing of the ORM's collector: no signal
    receivers, and no relations pointing at it from models other than ``but_for`` (whose rows
    the caller deletes itself)."""
    return not (
        models.signals.pre_delete.has_listeners(model)
        or models.signals.post_delete.has_listeners(model)
        or any(r.related_model not in but_for for r in model._meta.related_objects)
    )


def delete_in(
    model: type[models.Model],
    key: str,
    keys: Sequence[Any],
    *,
    where: Mapping[str, Any] | None = None,
) -> int:
    """Delete the rows whose ``key`` is one of ``keys``; the caller has made sure that
    :func:`can_delete_plainly` (or has deleted what points at them itself)."""

    def statement(db: Any, condition: str) -> str:
        return f"DELETE FROM {db.ops.quote_name(model._meta.db_table)} WHERE {condition}"

    return sum(c.rowcount for c in _by_keys(model, key, keys, where, statement))


def chunks(items: Sequence[Any], size: int = MAX_KEYS) -> list[Sequence[Any]]:
    """``items`` in slices of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- COPY ----------------------------------------------------------------------------------------


def insert_rows(
    model: type[models.Model], names: Sequence[str], rows: Sequence[Sequence[Any]], key: str
) -> list[Any]:
    """Insert ``rows`` (values in the order of ``names``); returns each row's primary key, in the
    order of ``rows``. ``key`` names a field whose values differ between the rows (it tells the
    rows apart where the database returns them in an order of its own).

    A value of type ``bytes`` for a text field is taken as its UTF-8 text: an environ's JSON
    goes to PostgreSQL as it is, without being decoded and encoded again.
    """
    if not rows:
        return []
    db = _db()
    if db.vendor == "postgresql":
        pks = reserve_ids(model, len(rows))
        pk = model._meta.pk
        assert pk is not None
        copy_rows(model, [pk.name, *names], [(p, *row) for p, row in zip(pks, rows, strict=True)])
        return pks
    position = list(names).index(key)
    texts = [[_text(value) for value in row] for row in rows]
    if db.features.can_return_rows_from_bulk_insert:
        pk_name = model._meta.pk.name  # type: ignore[union-attr]
        pk_of = dict(insert_returning(model, names, texts, [key, pk_name]))
        return [pk_of[row[position]] for row in texts]
    attnames = [_field(model, name).attname for name in names]
    return [
        model._default_manager.create(**dict(zip(attnames, row, strict=True))).pk for row in texts
    ]


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def reserve_ids(model: type[models.Model], count: int) -> list[int]:
    """``count`` new primary keys from the sequence of ``model``'s table (PostgreSQL)."""
    db = _db()
    pk = model._meta.pk
    assert pk is not None
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
            [db.ops.quote_name(model._meta.db_table), pk.column, count],
        )
        return [pk for (pk,) in cursor.fetchall()]


#: COPY's text format: what a value's text must escape.
_COPY_ESCAPES = ((b"\\", b"\\\\"), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\t", b"\\t"))


def _copy_value(value: Any) -> bytes:
    if value is None:
        return b"\\N"
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, datetime.datetime | datetime.date):
        data = value.isoformat().encode()
    else:
        data = str(value).encode()
    for raw, escaped in _COPY_ESCAPES:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def copy_rows(
    model: type[models.Model], names: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` with ``COPY ... FROM STDIN`` (PostgreSQL, psycopg2 or psycopg 3).

    Values go through their fields' ``get_db_prep_save`` as in :func:`insert_returning`, except
    ``bytes`` for text fields, taken as UTF-8 text.
    """
    db = _db()
    target, prepare = _target(model, names, db)
    sql = f"COPY {target} FROM STDIN"

    def lines() -> Iterator[bytes]:
        # One row's line at a time: the rows' escaped copy never exists whole (a batch of
        # large environs is megabytes).
        for row in rows:
            values = [
                value if isinstance(value, bytes) else p(value)
                for p, value in zip(prepare, row, strict=True)
            ]
            yield b"\t".join(_copy_value(v) for v in values) + b"\n"

    with db.cursor() as cursor:
        raw = cursor.cursor
        if hasattr(raw, "copy"):  # psycopg 3
            with raw.copy(sql) as copy:
                for line in lines():
                    copy.write(line)
        else:  # psycopg2
            raw.copy_expert(sql, _Lines(lines()), size=1 << 20)


class _Lines:
    """A file psycopg2's ``copy_expert`` reads from: the lines, in reads of about ``size``."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines

    def read(self, size: int = -1) -> bytes:
        out: list[bytes] = []
        got = 0
        for line in self._lines:
            out.append(line)
            got += len(line)
            if 0 <= size <= got:
                break
        return b"".join(out)

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)
