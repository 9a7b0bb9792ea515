"""The SQLite ledger of requests and evictions: a side channel that never breaks the chat.

Rows are handed to one writer thread through a queue, so a slow, locked, read-only or vanished
database file never delays a reply. A failure is reported once (`warning`) and the writer keeps
trying with each later row, so every row that can be written is written.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlite_utils

from kvchat.records import Eviction
from kvchat.records import Usage

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0  # wait this long for another writer's lock before counting a failure


def m001_requests(db: sqlite_utils.Database) -> None:
    db["requests"].create(
        {
            "id": int, "ts": float, "session": str, "model": str,
            "prompt_tokens": int, "cached_tokens": int, "cache_source": str, "new_tokens": int,
            "wait_ms": float, "ttft_ms": float, "total_ms": float, "decode_tokens_per_s": float,
            "finish_reason": str, "cache_bytes": int, "evictions": int,
        },
        pk="id",
    )  # fmt: skip
    db["requests"].create_index(["ts"])


def m002_evictions(db: sqlite_utils.Database) -> None:
    db["evictions"].create(
        {"id": int, "ts": float, "request_id": int, "kind": str, "num_tokens": int, "nbytes": int},
        pk="id",
        foreign_keys=[("request_id", "requests", "id")],
    )


def m003_message_text(db: sqlite_utils.Database) -> None:
    """Columns for the opt-in --store-text; they stay NULL otherwise."""
    db["requests"].add_column("user_text", str)
    db["requests"].add_column("reply_text", str)


def m004_budget(db: sqlite_utils.Database) -> None:
    """The budget each request ran under, so 'bytes held vs budget' can be plotted from the log."""
    db["requests"].add_column("budget_bytes", int)


def m005_not_admitted(db: sqlite_utils.Database) -> None:
    """Caches a request could not keep because they alone did not fit the budget."""
    db["requests"].add_column("not_admitted", int, not_null_default=0)


def m006_batching(db: sqlite_utils.Database) -> None:
    """How a request was served among others: requests ahead of it on arrival, and the mean number
    of requests in the forwards that decoded its reply."""
    db["requests"].add_column("queued_behind", int, not_null_default=0)
    db["requests"].add_column("batch_size", float, not_null_default=0)


def m007_disk_tier(db: sqlite_utils.Database) -> None:
    """Reuse read back from disk, and whether an eviction dropped a run or demoted it to disk."""
    db["requests"].add_column("disk_tokens", int, not_null_default=0)
    db["requests"].add_column("cache_tier", str, not_null_default="none")
    db["evictions"].add_column("tier", str, not_null_default="memory")
    db["evictions"].add_column("demoted", int, not_null_default=0)


def m008_door(db: sqlite_utils.Database) -> None:
    """Which door a request came through: ui, api or library ("" for rows from before)."""
    db["requests"].add_column("door", str, not_null_default="")


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (
    m001_requests, m002_evictions, m003_message_text, m004_budget, m005_not_admitted, m006_batching,
    m007_disk_tier, m008_door,
)


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations not yet recorded in `_migrations`; returns their names."""
    db["_migrations"].create({"name": str, "applied_ts": float}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for migration in MIGRATIONS:
        if migration.__name__ in done:
            continue
        with db.conn:
            migration(db)
            db["_migrations"].insert({"name": migration.__name__, "applied_ts": time.time()})
        applied.append(migration.__name__)
    return applied


@dataclass(frozen=True, slots=True)
class _Row:
    usage: Usage
    evictions: tuple[Eviction, ...]
    user_text: str | None
    reply_text: str | None


@dataclass(frozen=True, slots=True)
class UsageSummary:
    requests: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    evictions: int
    warm_requests: int  # served some tokens from cache
    cold_requests: int
    median_ttft_warm_ms: float | None
    median_ttft_cold_ms: float | None

    @property
    def token_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class UsageLog:
    def __init__(self, path: str | Path, store_text: bool = False) -> None:
        self.path = Path(path)
        self.store_text = store_text
        self.warning: str | None = None  # first failure, shown once to the user
        self.rows_written = 0
        self.rows_failed = 0
        self._queue: queue.SimpleQueue[_Row | threading.Event | None] = queue.SimpleQueue()
        self._db: sqlite_utils.Database | None = None
        self._writer = threading.Thread(target=self._write_loop, name="kvchat-usage-log", daemon=True)
        self._writer.start()

    def record(
        self, usage: Usage, evictions: Sequence[Eviction] = (), user_text: str | None = None,
        reply_text: str | None = None,
    ) -> None:
        """Queue one request's row; returns at once. Text is dropped unless `store_text`."""
        if not self.store_text:
            user_text = reply_text = None
        self._queue.put(_Row(usage, tuple(evictions), user_text, reply_text))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued row was written or failed. False on timeout."""
        reached = threading.Event()
        self._queue.put(reached)
        return reached.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then close the file (used on shutdown and SIGTERM)."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout_s)

    # --- writer thread ---
    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._write(item)
        if self._db is not None:
            self._db.close()

    def _write(self, row: _Row) -> None:
        try:
            db = self._open()
            with db.conn:
                request_id = db["requests"].insert(
                    {**asdict(row.usage), "user_text": row.user_text, "reply_text": row.reply_text}
                ).last_pk
                db["evictions"].insert_all(
                    {"ts": row.usage.ts, "request_id": request_id, "kind": ev.key.split(":", 1)[0],
                     "num_tokens": ev.num_tokens, "nbytes": ev.nbytes, "tier": ev.tier, "demoted": ev.demoted}
                    for ev in row.evictions
                )  # fmt: skip
            self.rows_written += 1
        except (sqlite3.Error, OSError) as err:
            self.rows_failed += 1
            self._drop_connection()
            self._warn_once(f"usage log {self.path} not written ({err}); the chat goes on without it")

    def _open(self) -> sqlite_utils.Database:
        if self._db is not None and self.path.exists():
            return self._db
        self._drop_connection()  # the file was deleted under us: start a fresh one
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        migrate(db)
        self._db = db
        return db

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _warn_once(self, message: str) -> None:
        if self.warning is None:
            self.warning = message
            log.warning(message)

    # --- readers (any thread; own short-lived connection) ---
    def summary(self, last: int = 10_000) -> UsageSummary | None:
        """Aggregates over the last `last` requests; None if the file cannot be read."""
        rows = self._query(
            "select prompt_tokens, cached_tokens, ttft_ms, finish_reason, evictions from requests "
            "order by id desc limit ?",
            [last],
        )
        if rows is None:
            return None
        ok = [r for r in rows if r["finish_reason"] in ("stop", "length")]
        warm = [r["ttft_ms"] for r in ok if r["cached_tokens"] > 0]
        cold = [r["ttft_ms"] for r in ok if r["cached_tokens"] == 0]
        return UsageSummary(
            requests=len(rows),
            errors=sum(r["finish_reason"] == "error" for r in rows),
            prompt_tokens=sum(r["prompt_tokens"] for r in rows),
            cached_tokens=sum(r["cached_tokens"] for r in rows),
            evictions=sum(r["evictions"] for r in rows),
            warm_requests=len(warm),
            cold_requests=len(cold),
            median_ttft_warm_ms=statistics.median(warm) if warm else None,
            median_ttft_cold_ms=statistics.median(cold) if cold else None,
        )

    def recent(self, limit: int = 10) -> list[dict] | None:
        return self._query(
            "select ts, cache_source, cache_tier, prompt_tokens, cached_tokens, new_tokens, ttft_ms, finish_reason "
            "from requests order by id desc limit ?",
            [limit],
        )

    def timeline(self, limit: int = 300) -> list[dict] | None:
        """The last `limit` requests, oldest first, for the stats plots."""
        rows = self._query(
            "select id, ts, prompt_tokens, cached_tokens, ttft_ms, cache_bytes, budget_bytes, finish_reason "
            "from requests order by id desc limit ?",
            [limit],
        )
        return None if rows is None else rows[::-1]

    def _query(self, sql: str, params: list) -> list[dict] | None:
        if not self.path.exists():
            return []
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
            try:
                conn.row_factory = sqlite3.Row
                return [dict(row) for row in conn.execute(sql, params)]
            finally:
                conn.close()
        except sqlite3.Error as err:
            if "no such table" in str(err):
                return []
            self._warn_once(f"usage log {self.path} cannot be read ({err})")
            return None
