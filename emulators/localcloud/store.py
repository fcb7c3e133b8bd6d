"""Durable state: one SQLite database under the state dir.

Every acknowledged change is committed (WAL, ``synchronous=FULL``) before the RPC answers, so a
``kill -9`` of the server at any moment loses nothing a client was told had happened, and a
half-written change is never visible (SQLite's transactions are atomic). Resources are stored as
their serialized protobuf messages, keyed by resource name; process bookkeeping (pids, ports) is a
small JSON key-value table beside them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

M = TypeVar("M")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    parent TEXT,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def serialize(message) -> bytes:
    """Bytes of a proto-plus message or a raw protobuf message."""
    if hasattr(message, "SerializeToString"):
        return message.SerializeToString()
    return type(message).serialize(message)


def deserialize(cls, data: bytes):
    return cls.FromString(data) if hasattr(cls, "FromString") else cls.deserialize(data)


class Store:
    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[Store]:
        """An atomic read-modify-write: everything inside commits together or not at all."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    # ---- resources (serialized proto-plus messages)
    def put(self, kind: str, name: str, message, parent: str | None = None) -> None:
        data = serialize(message)
        with self.tx():
            row = self._db.execute("SELECT seq FROM resources WHERE kind=? AND name=?", (kind, name)).fetchone()
            seq = row[0] if row else self._next("seq")
            self._db.execute(
                "INSERT OR REPLACE INTO resources(kind, name, parent, seq, data) VALUES (?, ?, ?, ?, ?)",
                (kind, name, parent, seq, data),
            )

    def get(self, kind: str, name: str, cls: type[M]) -> M | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM resources WHERE kind=? AND name=?", (kind, name)).fetchone()
        return deserialize(cls, row[0]) if row else None

    def list(self, kind: str, cls: type[M], parent: str | None = None, prefix: str | None = None) -> list[M]:
        """Resources of ``kind`` in creation order (optionally under ``parent`` / with a name ``prefix``)."""
        query, args = "SELECT data FROM resources WHERE kind=?", [kind]
        if parent is not None:
            query += " AND parent=?"
            args.append(parent)
        if prefix is not None:
            query += " AND substr(name, 1, ?)=?"
            args += [len(prefix), prefix]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq", args).fetchall()
        return [deserialize(cls, r[0]) for r in rows]

    def delete(self, kind: str, name: str) -> None:
        with self.tx():
            self._db.execute("DELETE FROM resources WHERE kind=? AND name=?", (kind, name))

    # ---- counters and small JSON values
    def _next(self, counter: str) -> int:
        with self.tx():
            row = self._db.execute("SELECT value FROM counters WHERE name=?", (counter,)).fetchone()
            value = (row[0] if row else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)", (counter, value))
            return value

    def next_id(self, counter: str) -> int:
        return self._next(counter)

    def set_value(self, key: str, value: Any) -> None:
        with self.tx():
            self._db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_value(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def delete_value(self, key: str) -> None:
        with self.tx():
            self._db.execute("DELETE FROM kv WHERE key=?", (key,))

    def values_with_prefix(self, prefix: str) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM kv WHERE substr(key, 1, ?)=?",
                                    (len(prefix), prefix)).fetchall()
        return {k: json.loads(v) for k, v in rows}
