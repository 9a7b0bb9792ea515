import os
import sqlite3
import time

import pytest
import sqlite_utils

from kvchat.lru import Eviction
from kvchat.usage import Usage
from kvchat.usage_log import UsageLog, migrate


def usage(**fields) -> Usage:
    base = dict(ts=time.time(), session="abc", model="m", prompt_tokens=100, cached_tokens=90,
                cache_source="session", new_tokens=5, ttft_ms=12.0, total_ms=50.0, finish_reason="stop")  # fmt: skip
    return Usage(**{**base, **fields})


def test_rows_and_evictions_are_written_by_migrated_schema(usage_db):
    log = UsageLog(usage_db)
    log.record(usage(), [Eviction("session:x", 4096, 10), Eviction("prefix:ab", 2048, 5)])
    log.record(usage(cached_tokens=0, cache_source="none", ttft_ms=40.0))
    assert log.flush()
    db = sqlite_utils.Database(usage_db)
    assert db["requests"].count == 2
    evictions = list(db["evictions"].rows)
    assert [(e["kind"], e["nbytes"], e["request_id"]) for e in evictions] == [("session", 4096, 1), ("prefix", 2048, 1)]
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert migrate(db) == []  # already applied: nothing runs twice
    summary = log.summary()
    assert (summary.requests, summary.warm_requests, summary.cold_requests) == (2, 1, 1)
    assert summary.median_ttft_cold_ms == 40.0 and summary.token_hit_rate == pytest.approx(90 / 200)
    log.close()


def test_text_is_stored_only_when_asked(tmp_path):
    for store_text in (False, True):
        path = tmp_path / f"{store_text}.db"
        log = UsageLog(path, store_text=store_text)
        log.record(usage(), user_text="my secret question", reply_text="an answer")
        log.close()
        row = next(sqlite_utils.Database(path)["requests"].rows)
        assert (row["user_text"] == "my secret question") is store_text


def test_unwritable_database_warns_once_and_never_raises(tmp_path):
    log = UsageLog(tmp_path / "missing-dir" / "usage.db")
    for _ in range(3):
        log.record(usage())
    assert log.flush()
    assert log.rows_failed == 3 and log.rows_written == 0
    assert "not written" in log.warning
    assert log.summary().requests == 0  # nothing to read, and no exception


def test_deleted_file_is_recreated_and_later_rows_land(usage_db):
    log = UsageLog(usage_db)
    log.record(usage())
    assert log.flush()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{usage_db}{suffix}"):
            os.remove(f"{usage_db}{suffix}")
    log.record(usage())
    log.record(usage())
    log.close()
    assert sqlite_utils.Database(usage_db)["requests"].count == 2
    assert log.rows_written == 3


def test_locked_database_waits_for_the_other_writer(usage_db):
    log = UsageLog(usage_db)
    log.record(usage())
    assert log.flush()
    blocker = sqlite3.connect(usage_db)
    blocker.execute("begin exclusive")
    log.record(usage())  # returns at once: the writer thread waits, not the chat
    time.sleep(1.0)
    blocker.rollback()
    blocker.close()
    log.close()
    assert sqlite_utils.Database(usage_db)["requests"].count == 2
    assert log.warning is None
