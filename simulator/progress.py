"""The progress table (the thesis's DynamoDB table): one item per round and one per run.

Two backends share one interface, :class:`ProgressTable`:

* :class:`SqliteProgressTable` (default): an SQLite file on EFS, ``runs/<run>/progress.sqlite``.
* :class:`DynamoProgressTable`: a DynamoDB table through boto3's resource API, for AWS.

Only the fan-out claimer of a round and the combine write (never the N workers), so writes are
few; every write is a short transaction. Writers of one item are ordered by the protocol itself
(a round's row is created before its workers are invoked and completed by its combine), so a
plain upsert of the fields a call names is enough. Repeating a call (an at-least-once retry)
writes the same values again.

SQLite schema. The journal is a rollback journal (``journal_mode=TRUNCATE``, not WAL: WAL needs
memory shared between the processes that open the file, which NFS and so EFS cannot provide);
short ``BEGIN IMMEDIATE`` transactions and a busy timeout let readers poll while training runs::

    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,         -- 'running' | 'finished' | 'failed'
        workers INTEGER, algorithm TEXT, model TEXT, dataset TEXT,
        rounds_done INTEGER,          -- rounds combined so far
        epochs_done REAL,             -- rounds_done / rounds per epoch
        loss REAL, accuracy REAL,     -- held-out metrics of the last evaluated round
        reason TEXT,                  -- why it stopped or failed
        started_at REAL, updated_at REAL, finished_at REAL   -- Unix epoch seconds
    );
    CREATE TABLE rounds (
        run_id TEXT NOT NULL,
        "round" INTEGER NOT NULL,     -- 0-based; row r describes the step from weights r to r+1
        status TEXT NOT NULL,         -- 'running' | 'combined' | 'failed'
        epoch INTEGER,                -- the epoch whose data the round used
        epochs_done REAL,             -- (round + 1) / rounds per epoch, once combined
        workers INTEGER,
        samples INTEGER,              -- samples all workers processed (less if stopped early)
        train_loss REAL,              -- mean training loss the workers saw
        loss REAL, accuracy REAL,     -- held-out metrics after the round (NULL if not evaluated)
        worker_ms_max REAL, worker_ms_mean REAL,   -- per-role durations: workers' compute
        combine_ms REAL,                           -- and the combine's aggregate+update+eval
        started_at REAL, combined_at REAL, updated_at REAL,
        note TEXT,                    -- stop reason or failure reason
        PRIMARY KEY (run_id, "round")
    );

DynamoDB mapping: one table with partition key ``run_id`` (S) and sort key ``round`` (N); the run
item has ``round = -1`` and ``item = "run"``, round items ``item = "round"``; the other attributes
are the columns above (floats as ``Decimal``, NULLs omitted).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

RUN_STATUSES = ("running", "finished", "failed")
ROUND_STATUSES = ("running", "combined", "failed")
RUN_ITEM_ROUND = -1
"""Sort key of the run item in the DynamoDB table."""

Op = tuple[str, str, int, Mapping[str, Any]]
"""(kind 'run' or 'round', run_id, round, values to set)."""


@dataclass(frozen=True)
class RunRow:
    """The run item: status and the latest metrics."""

    run_id: str
    status: str
    workers: int | None = None
    algorithm: str | None = None
    model: str | None = None
    dataset: str | None = None
    rounds_done: int | None = None
    epochs_done: float | None = None
    loss: float | None = None
    accuracy: float | None = None
    reason: str | None = None
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class RoundRow:
    """One round's item (see the module docstring for each field)."""

    run_id: str
    round: int
    status: str
    epoch: int | None = None
    epochs_done: float | None = None
    workers: int | None = None
    samples: int | None = None
    train_loss: float | None = None
    loss: float | None = None
    accuracy: float | None = None
    worker_ms_max: float | None = None
    worker_ms_mean: float | None = None
    combine_ms: float | None = None
    started_at: float | None = None
    combined_at: float | None = None
    updated_at: float | None = None
    note: str | None = None


_INT_FIELDS = frozenset({"workers", "rounds_done", "round", "epoch", "samples"})
_STR_FIELDS = frozenset(
    {"run_id", "status", "algorithm", "model", "dataset", "reason", "note", "item"}
)
RUN_COLUMNS = tuple(f.name for f in fields(RunRow))
ROUND_COLUMNS = tuple(f.name for f in fields(RoundRow))


def _clean(value: Any) -> Any:
    # Non-finite floats have no JSON/DynamoDB form; a diverged loss is recorded as NULL and the
    # reason says why.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _started(epoch: int, workers: int, started_at: float) -> dict[str, Any]:
    return {
        "status": "running",
        "epoch": epoch,
        "workers": workers,
        "started_at": started_at,
        "updated_at": started_at,
    }


class ProgressTable(ABC):
    """What the roles record and what a user (or the runner) reads while training runs."""

    # ---- writes ------------------------------------------------------------------------
    def run_started(
        self,
        run_id: str,
        *,
        workers: int,
        algorithm: str,
        model: str,
        dataset: str,
        started_at: float,
    ) -> None:
        """Create the run item (status 'running')."""
        self._upsert_run(
            run_id,
            {
                "status": "running",
                "workers": workers,
                "algorithm": algorithm,
                "model": model,
                "dataset": dataset,
                "rounds_done": 0,
                "epochs_done": 0.0,
                "started_at": started_at,
                "updated_at": started_at,
            },
        )

    def round_started(
        self, run_id: str, round: int, *, epoch: int, workers: int, started_at: float
    ) -> None:
        """Create round `round`'s item when its workers are fanned out."""
        self._upsert_round(run_id, round, _started(epoch, workers, started_at))

    def round_combined(
        self,
        run_id: str,
        round: int,
        *,
        epoch: int,
        epochs_done: float,
        workers: int,
        samples: int,
        train_loss: float | None,
        loss: float | None,
        accuracy: float | None,
        worker_ms_max: float | None,
        worker_ms_mean: float | None,
        combine_ms: float | None,
        combined_at: float,
        note: str | None = None,
        next_round: tuple[int, int, float] | None = None,
    ) -> None:
        """Complete round `round`'s item and bring the run item's latest metrics up to date.

        `next_round` = (round, epoch, started_at) also opens the next round's item, all in one
        transaction (the fan-out winner's single write per round).
        """
        values = {
            "status": "combined",
            "epoch": epoch,
            "epochs_done": epochs_done,
            "workers": workers,
            "samples": samples,
            "train_loss": train_loss,
            "loss": loss,
            "accuracy": accuracy,
            "worker_ms_max": worker_ms_max,
            "worker_ms_mean": worker_ms_mean,
            "combine_ms": combine_ms,
            "combined_at": combined_at,
            "updated_at": combined_at,
            "note": note,
        }
        run_values: dict[str, Any] = {
            "rounds_done": round + 1,
            "epochs_done": epochs_done,
            "updated_at": combined_at,
        }
        if loss is not None:
            run_values.update(loss=loss, accuracy=accuracy)
        # One transaction for all items: a reader never sees the round done but the run behind.
        ops: list[Op] = [
            ("round", run_id, round, values),
            ("run", run_id, RUN_ITEM_ROUND, run_values),
        ]
        if next_round is not None:
            nxt, epoch_next, started_at = next_round
            ops.append(("round", run_id, nxt, _started(epoch_next, workers, started_at)))
        self._apply(ops)

    def round_failed(self, run_id: str, round: int, *, reason: str, at: float) -> None:
        """Mark round `round` failed with `reason`."""
        self._upsert_round(run_id, round, {"status": "failed", "note": reason, "updated_at": at})

    def run_finished(
        self, run_id: str, *, status: str, reason: str, at: float, **metrics: Any
    ) -> None:
        """Mark the run 'finished' or 'failed' with `reason` (metrics: rounds_done, loss, ...)."""
        if status not in ("finished", "failed"):
            raise ValueError(f"status: must be 'finished' or 'failed', got {status!r}")
        unknown = set(metrics) - {"rounds_done", "epochs_done", "loss", "accuracy"}
        if unknown:
            raise ValueError(f"metrics: unknown fields {sorted(unknown)}")
        values = {"status": status, "reason": reason, "finished_at": at, "updated_at": at}
        values.update({k: v for k, v in metrics.items() if v is not None})
        self._upsert_run(run_id, values)

    # ---- reads -------------------------------------------------------------------------
    @abstractmethod
    def get_run(self, run_id: str) -> RunRow | None:
        """The run item, or None if the run has not started."""

    @abstractmethod
    def rounds(self, run_id: str) -> list[RoundRow]:
        """Every round item of the run, by round."""

    # ---- backend hooks -----------------------------------------------------------------
    def _upsert_run(self, run_id: str, values: Mapping[str, Any]) -> None:
        self._apply([("run", run_id, RUN_ITEM_ROUND, values)])

    def _upsert_round(self, run_id: str, round: int, values: Mapping[str, Any]) -> None:
        self._apply([("round", run_id, round, values)])

    @abstractmethod
    def _apply(self, ops: Sequence[Op]) -> None:
        """Create or update each (kind, run_id, round, values) item, setting only `values`."""


# ------------------------------------------------------------------------------------------
# SQLite on EFS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, workers INTEGER, algorithm TEXT,
    model TEXT, dataset TEXT, rounds_done INTEGER, epochs_done REAL, loss REAL, accuracy REAL,
    reason TEXT, started_at REAL, updated_at REAL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, "round" INTEGER NOT NULL, status TEXT NOT NULL, epoch INTEGER,
    epochs_done REAL, workers INTEGER, samples INTEGER, train_loss REAL, loss REAL,
    accuracy REAL, worker_ms_max REAL, worker_ms_mean REAL, combine_ms REAL, started_at REAL,
    combined_at REAL, updated_at REAL, note TEXT, PRIMARY KEY (run_id, "round")
);
"""

_schema_ready: set[str] = set()
_schema_guard = threading.Lock()


def _q(column: str) -> str:
    return f'"{column}"'


class SqliteProgressTable(ProgressTable):
    """The progress table as an SQLite file (schema in the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s

    @contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        # A connection per operation: the roles run in many processes on many hosts, and a short
        # life keeps no lock and no stale page cache across invocations.
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        else:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=self.busy_timeout_s,
                isolation_level=None,
            )
        try:
            if write:
                # TRUNCATE keeps the journal file (no create/unlink per transaction); NORMAL
                # still syncs at the commit points that keep the file consistent.
                conn.execute("PRAGMA journal_mode=TRUNCATE")
                conn.execute("PRAGMA synchronous=NORMAL")
                key = str(self.path.resolve())
                if key not in _schema_ready:
                    conn.executescript(_SCHEMA)
                    with _schema_guard:
                        _schema_ready.add(key)
            yield conn
        finally:
            conn.close()

    def _apply(self, ops: Sequence[Op]) -> None:
        with self._connect(write=True) as conn:
            # BEGIN IMMEDIATE takes the write lock up front, so a busy database waits (busy
            # timeout) instead of failing half-way through a deferred transaction.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for kind, run_id, round, values in ops:
                    if kind == "run":
                        _check_columns(values, RUN_COLUMNS)
                        self._upsert(conn, "runs", {"run_id": run_id}, values)
                    else:
                        _check_columns(values, ROUND_COLUMNS)
                        self._upsert(conn, "rounds", {"run_id": run_id, "round": round}, values)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _upsert(
        conn: sqlite3.Connection, table: str, key: Mapping[str, Any], values: Mapping[str, Any]
    ) -> None:
        # UPDATE, then INSERT if no row matched: an INSERT ... ON CONFLICT would check the NOT
        # NULL status of the would-be new row even when it ends up updating an existing one.
        clean = {k: _clean(v) for k, v in values.items()}
        where = " AND ".join(f"{_q(c)} = ?" for c in key)
        sets = ", ".join(f"{_q(c)} = ?" for c in clean)
        cur = conn.execute(
            f"UPDATE {table} SET {sets} WHERE {where}", (*clean.values(), *key.values())
        )
        if cur.rowcount == 0:
            row = {"status": "running", **key, **clean}
            cols = ", ".join(_q(c) for c in row)
            marks = ", ".join("?" for _ in row)
            conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        if not self.path.exists():
            return []
        with self._connect(write=False) as conn:
            conn.row_factory = sqlite3.Row
            try:
                return list(conn.execute(sql, args))
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # created but not yet initialised
                    return []
                raise

    def get_run(self, run_id: str) -> RunRow | None:
        """The run item, or None."""
        rows = self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return RunRow(**{k: rows[0][k] for k in RUN_COLUMNS}) if rows else None

    def rounds(self, run_id: str) -> list[RoundRow]:
        """Every round item of the run, by round."""
        rows = self._read('SELECT * FROM rounds WHERE run_id = ? ORDER BY "round"', (run_id,))
        return [RoundRow(**{k: r[k] for k in ROUND_COLUMNS}) for r in rows]


def _check_columns(values: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = set(values) - set(allowed)
    if unknown:
        raise ValueError(f"values: unknown columns {sorted(unknown)}; allowed: {allowed}")


# ------------------------------------------------------------------------------------------
# DynamoDB


def to_dynamo_item(run_id: str, round: int, kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A DynamoDB item (resource API types): floats as Decimal, None and non-finite dropped."""
    item: dict[str, Any] = {"run_id": run_id, "round": round, "item": kind}
    for key, value in values.items():
        value = _clean(value)
        if value is None:
            continue
        if isinstance(value, float):
            # Decimal(repr) keeps the shortest round-trip text, so reading back gives the float.
            item[key] = Decimal(repr(value))
        elif isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{key}: cannot store {type(value).__name__} {value!r}")
        else:
            item[key] = value
    return item


def from_dynamo_item(item: Mapping[str, Any]) -> RunRow | RoundRow:
    """The row a DynamoDB item stands for (Decimal back to int or float by column)."""
    kind = item.get("item")
    cls: type[RunRow] | type[RoundRow] = RunRow if kind == "run" else RoundRow
    if kind not in ("run", "round"):
        raise ValueError(f"item: must be 'run' or 'round', got {kind!r}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in item:
            continue
        value = item[f.name]
        if isinstance(value, Decimal):
            value = int(value) if f.name in _INT_FIELDS else float(value)
        values[f.name] = value
    return cls(**values)


class DynamoProgressTable(ProgressTable):
    """The progress table in DynamoDB (key schema: run_id HASH, round RANGE; see module doc)."""

    def __init__(self, table_name: str | None = None, *, table: Any = None) -> None:
        if table is None:
            if not table_name:
                raise ValueError("progress_table: a DynamoDB table name is required")
            import boto3  # imported on use: SQLite users never pay for it

            table = boto3.resource("dynamodb").Table(table_name)
        self.table = table

    def _merge(self, run_id: str, round: int, kind: str, values: Mapping[str, Any]) -> None:
        # Read-merge-write: writers of one item are causally ordered by the protocol (see the
        # module docstring), so there is no lost update to guard against with a condition.
        key = {"run_id": run_id, "round": round}
        current = dict(self.table.get_item(Key=key, ConsistentRead=True).get("Item") or {})
        new = to_dynamo_item(run_id, round, kind, values)
        for name, value in values.items():
            if _clean(value) is None:
                current.pop(name, None)  # an explicit None clears the attribute
        current.update(new)
        self.table.put_item(Item=current)

    def _apply(self, ops: Sequence[Op]) -> None:
        for kind, run_id, round, values in ops:
            _check_columns(values, RUN_COLUMNS if kind == "run" else ROUND_COLUMNS)
            self._merge(run_id, round, kind, values)

    def get_run(self, run_id: str) -> RunRow | None:
        """The run item, or None."""
        key = {"run_id": run_id, "round": RUN_ITEM_ROUND}
        item = self.table.get_item(Key=key, ConsistentRead=True).get("Item")
        if not item:
            return None
        row = from_dynamo_item(item)
        assert isinstance(row, RunRow)
        return row

    def rounds(self, run_id: str) -> list[RoundRow]:
        """Every round item of the run, by round (paginated query)."""
        from boto3.dynamodb.conditions import Key

        condition = Key("run_id").eq(run_id) & Key("round").gte(0)
        out: list[RoundRow] = []
        kwargs: dict[str, Any] = {"KeyConditionExpression": condition, "ConsistentRead": True}
        while True:
            page = self.table.query(**kwargs)
            for item in page.get("Items", []):
                row = from_dynamo_item(item)
                assert isinstance(row, RoundRow)
                out.append(row)
            last = page.get("LastEvaluatedKey")
            if not last:
                break
            kwargs["ExclusiveStartKey"] = last
        return sorted(out, key=lambda r: r.round)


def open_progress(
    kind: str, sqlite_path: str | os.PathLike[str], table_name: str | None = None
) -> ProgressTable:
    """The progress table a run's config names: 'sqlite' (at sqlite_path) or 'dynamodb'."""
    if kind == "sqlite":
        return SqliteProgressTable(sqlite_path)
    if kind == "dynamodb":
        return DynamoProgressTable(table_name)
    raise ValueError(f"progress: must be 'sqlite' or 'dynamodb', got {kind!r}")


__all__ = [
    "ROUND_COLUMNS",
    "ROUND_STATUSES",
    "RUN_COLUMNS",
    "RUN_ITEM_ROUND",
    "RUN_STATUSES",
    "DynamoProgressTable",
    "ProgressTable",
    "RoundRow",
    "RunRow",
    "SqliteProgressTable",
    "from_dynamo_item",
    "open_progress",
    "to_dynamo_item",
]
