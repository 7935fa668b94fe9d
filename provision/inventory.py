"""The factory inventory: per-device step states, versions, certificate fingerprints,
watermark id, log excerpt, and an audit trail of enrolment events.

One SQLite file in WAL mode by default (``sqlite:///abs/path`` or ``sqlite:relative``), or
a PostgreSQL database shared by several stations (``postgresql://user@host:port/dbname``,
any libpq URL, via psycopg 3). Every write is its own short transaction, so a killed station
leaves a consistent inventory and `apply` resumes from it.

Several stations on one PostgreSQL: a station works on a device only while it holds that
device's advisory lock (session-level, `claim`); another station meanwhile reports the device
as busy instead of enrolling it a second time, and a station that dies loses its locks with
its connection. (SQLite is one station's file: `claim` there always succeeds.)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import ProvisionError

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    serial TEXT PRIMARY KEY,
    address TEXT NOT NULL, port INTEGER NOT NULL, hostname TEXT NOT NULL, device_id TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done | failed
    step TEXT, error TEXT,
    image_version TEXT, host_key_fp TEXT,
    device_pubkey TEXT, device_key_fp TEXT,
    host_cert TEXT, host_cert_fp TEXT, client_cert TEXT, client_cert_fp TEXT,
    watermark_id TEXT, model_name TEXT, model_version TEXT, package_sha256 TEXT,
    selftest TEXT, log_excerpt TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    updated_at REAL, enrolled_at REAL
);
CREATE TABLE IF NOT EXISTS steps (
    serial TEXT NOT NULL REFERENCES devices(serial), step TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL, finished_at REAL, detail TEXT,
    PRIMARY KEY (serial, step)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    serial TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_serial ON events(serial, kind);
"""

DEVICE_FIELDS = {
    "state", "step", "error", "image_version", "host_key_fp", "device_pubkey", "device_key_fp",
    "host_cert", "host_cert_fp", "client_cert", "client_cert_fp", "watermark_id", "model_name",
    "model_version", "package_sha256", "selftest", "log_excerpt", "enrolled_at",
}
LOG_LINES = 40


def default_url(fleet_file: Path) -> str:
    return f"sqlite:///{Path(fleet_file).resolve().parent / 'inventory.sqlite'}"


def _pg_schema() -> str:
    return (SCHEMA.replace("REAL", "DOUBLE PRECISION")
            .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"))


def is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    import re

    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def sqlite_path(url: str) -> Path:
    if url.startswith("sqlite:///"):
        return Path("/" + url[len("sqlite:///"):].lstrip("/"))
    if url.startswith("sqlite:"):
        return Path(url[len("sqlite:"):])
    raise ProvisionError(f"--inventory {url!r}: unknown URL (use sqlite:///PATH or postgresql://...)")


class Inventory:
    def __init__(self, url: str, create: bool = True):
        self.url = url
        self._lock = threading.Lock()
        self.pg = is_postgres(url)
        if self.pg:
            self.path = _redact(url)  # what messages show
            self._open_pg(create)
            return
        self.path = sqlite_path(url)
        if not create and not self.path.exists():
            raise ProvisionError(f"{self.path}: no inventory here yet (run `provision fleet apply` first)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                      timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ProvisionError(f"{self.path}: inventory unusable: {e}") from None

    def _open_pg(self, create: bool) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise ProvisionError(f"{self.path}: PostgreSQL inventories need psycopg "
                                 "(pip install 'psycopg[binary]')") from None
        self._pg_error = psycopg.Error
        try:
            self.db = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
            if create:
                with self.db.transaction():
                    # one station creates the schema; the others wait for it here
                    self.db.execute("SELECT pg_advisory_xact_lock(6)")
                    for stmt in _pg_schema().split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
            elif self.db.execute("SELECT to_regclass('devices') AS t").fetchone()["t"] is None:
                raise ProvisionError(f"{self.path}: no inventory here yet (run `provision fleet apply` first)")
        except psycopg.Error as e:
            raise ProvisionError(f"{self.path}: inventory unusable: {' '.join(str(e).split())}") from None

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _x(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            if self.pg:
                try:
                    cur = self.db.execute(sql.replace("?", "%s"), tuple(args))
                    return cur.fetchall() if cur.description else []
                except self._pg_error as e:
                    raise ProvisionError(f"{self.path}: inventory write failed: {' '.join(str(e).split())}") \
                        from None
            try:
                return self.db.execute(sql, tuple(args)).fetchall()
            except sqlite3.DatabaseError as e:
                raise ProvisionError(f"{self.path}: inventory write failed: {e}") from None

    # -- claims (several stations on one PostgreSQL) ----------------------------
    @staticmethod
    def _lock_key(serial: str) -> int:
        import hashlib

        return int.from_bytes(hashlib.sha256(b"appliance-provision:" + serial.encode()).digest()[:8],
                              "big", signed=True)

    def claim(self, serial: str) -> bool:
        """True if this station may work on SERIAL now (until `release`)."""
        if not self.pg:
            return True
        return bool(self._x("SELECT pg_try_advisory_lock(?) AS ok", (self._lock_key(serial),))[0]["ok"])

    def release(self, serial: str) -> None:
        if self.pg:
            self._x("SELECT pg_advisory_unlock(?) AS ok", (self._lock_key(serial),))

    # -- devices --------------------------------------------------------------
    def ensure_device(self, serial: str, address: str, port: int, hostname: str, device_id: str) -> None:
        self._x("INSERT INTO devices (serial, address, port, hostname, device_id, updated_at) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(serial) DO UPDATE SET address=excluded.address, "
                "port=excluded.port, hostname=excluded.hostname, device_id=excluded.device_id",
                (serial, address, port, hostname, device_id, time.time()))

    def get(self, serial: str) -> dict[str, Any]:
        rows = self._x("SELECT * FROM devices WHERE serial=?", (serial,))
        return dict(rows[0]) if rows else {}

    def update(self, serial: str, **fields: Any) -> None:
        bad = set(fields) - DEVICE_FIELDS
        if bad:
            raise ValueError(f"unknown inventory fields {bad}")
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        self._x(f"UPDATE devices SET {cols}, updated_at=? WHERE serial=?",
                (*fields.values(), time.time(), serial))

    def start_run(self, serial: str) -> None:
        self._x("UPDATE devices SET state='running', error=NULL, runs=runs+1, updated_at=? "
                "WHERE serial=?", (time.time(), serial))

    def devices(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._x("SELECT * FROM devices ORDER BY serial")]

    def append_log(self, serial: str, lines: list[str]) -> None:
        old = (self.get(serial).get("log_excerpt") or "").splitlines()
        self.update(serial, log_excerpt="\n".join((old + lines)[-LOG_LINES:]))

    # -- steps ----------------------------------------------------------------
    def step_state(self, serial: str, step: str) -> str | None:
        rows = self._x("SELECT state FROM steps WHERE serial=? AND step=?", (serial, step))
        return rows[0]["state"] if rows else None

    def steps(self, serial: str) -> dict[str, dict[str, Any]]:
        return {r["step"]: dict(r) for r in self._x("SELECT * FROM steps WHERE serial=?", (serial,))}

    def step_begin(self, serial: str, step: str) -> None:
        now = time.time()
        self._x("INSERT INTO steps (serial, step, state, attempts, started_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(serial, step) DO UPDATE SET state='running', attempts=steps.attempts+1, "
                "started_at=excluded.started_at, finished_at=NULL",
                (serial, step, "running", 1, now))
        self.update(serial, step=step)

    def step_end(self, serial: str, step: str, state: str, detail: str = "") -> None:
        self._x("UPDATE steps SET state=?, finished_at=?, detail=? WHERE serial=? AND step=?",
                (state, time.time(), detail[:500], serial, step))

    # -- events (audit) -------------------------------------------------------
    def event(self, serial: str, kind: str, detail: Any = None) -> None:
        self._x("INSERT INTO events (serial, kind, detail, at) VALUES (?,?,?,?)",
                (serial, kind, json.dumps(detail) if detail is not None else None, time.time()))

    def events(self, serial: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events WHERE 1=1", []
        if serial:
            sql, args = sql + " AND serial=?", args + [serial]
        if kind:
            sql, args = sql + " AND kind=?", args + [kind]
        return [dict(r) for r in self._x(sql + " ORDER BY id", args)]
