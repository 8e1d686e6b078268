"""The ledger's tables (SCHEMA), and how a database is recognised as a ledger (:func:`schema_problem`).

A ledger written before a table existed lacks that table and opens as before (the tables are created if missing);
no table of the ledger has ever lost or gained a column. A database with any other table, or with one of these
tables without its columns, is another application's.
"""
from __future__ import annotations

import contextlib
import functools
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS scored (
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    probability REAL NOT NULL,
    scored_utc TEXT NOT NULL,
    path TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (sha256, model)
);
CREATE TABLE IF NOT EXISTS out_of_scope (
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    reason TEXT NOT NULL,
    scored_utc TEXT NOT NULL,
    path TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (sha256, model)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    out_dir TEXT NOT NULL,
    model TEXT NOT NULL,
    images_new INTEGER NOT NULL,
    finished_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    onnx_sha256 TEXT NOT NULL,
    first_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS packages (
    model TEXT PRIMARY KEY,
    scoring_sha256 TEXT NOT NULL,
    first_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS drift (
    run_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    finished_utc TEXT NOT NULL,
    images INTEGER NOT NULL,
    judged INTEGER NOT NULL,
    detected INTEGER NOT NULL,
    domain_auc REAL,
    psi REAL,
    positive_rate REAL
);
CREATE TABLE IF NOT EXISTS drift_limits (
    run_id TEXT PRIMARY KEY,
    domain_auc_limit REAL NOT NULL,
    psi_limit REAL NOT NULL
);
"""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def tables(conn: sqlite3.Connection) -> dict[str, set[str]]:
    """Each table of the database (SQLite's own left out) -> its column names."""
    names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
             if not row[0].startswith("sqlite_")]
    return {name: {col[1] for col in conn.execute(f"PRAGMA table_info({_quoted(name)})")} for name in names}


@functools.cache
def _ledger_tables() -> dict[str, set[str]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.executescript(SCHEMA)
        return tables(conn)


def schema_problem(tables: dict[str, set[str]]) -> str | None:
    """Why a database with these tables is no ledger (another application's), or None. A ledger written before a
    table existed lacks that table, never a column."""
    ours = _ledger_tables()
    foreign = sorted(set(tables) - set(ours))
    if foreign:
        return f"it holds tables a ledger never has ({', '.join(foreign[:5])})"
    for name, columns in sorted(tables.items()):
        missing = sorted(ours[name] - columns)
        if missing:
            return f"its table {name} lacks the columns {', '.join(missing)}"
    return None


def damage(conn: sqlite3.Connection) -> str | None:
    """What SQLite's quick_check of the whole file finds wrong (one line), or None when it is sound. A damaged page
    went unseen before: a worker failed mid-night, every night ended in exit 3, or the job committed into it (QA). Its
    cost is a linear read of the file (docs/operations.md)."""
    found = [row[0] for row in conn.execute("PRAGMA quick_check")]
    return None if found == ["ok"] else " ".join("; ".join(found).split())[:200]
